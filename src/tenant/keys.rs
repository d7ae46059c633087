//! The DKIM public keys the verifier has looked up, kept until their DNS TTL ends: a
//! shared range sends thousands of messages signed with the same few keys, and each
//! would otherwise cost a resolver round and a key parse. Bounded: at [`CAPACITY`]
//! names the expired go, and if none has, everything does (the next lookups refill it).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use mail_auth::{ResolverCache, Txt};

pub const CAPACITY: usize = 4096;

#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<Box<str>, (Txt, Instant)>>,
}

impl KeyCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, (Txt, Instant)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ResolverCache<Box<str>, Txt> for KeyCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entries = self.lock();
        entries
            .get(name)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(txt, _)| txt.clone())
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().remove(name).map(|(txt, _)| txt)
    }

    fn insert(&self, name: Box<str>, value: Txt, valid_until: Instant) {
        let mut entries = self.lock();
        if entries.len() >= CAPACITY && !entries.contains_key(&name) {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(name, (value, valid_until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn txt() -> Txt {
        Txt::Error(mail_auth::Error::ParseError)
    }

    #[test]
    fn entries_live_until_their_ttl_and_the_cache_stays_bounded() {
        let cache = KeyCache::default();
        let later = Instant::now() + Duration::from_secs(60);
        cache.insert("a._domainkey.example.test".into(), txt(), later);
        assert!(cache.get("a._domainkey.example.test").is_some());
        cache.insert("b._domainkey.example.test".into(), txt(), Instant::now());
        assert!(cache.get("b._domainkey.example.test").is_none(), "expired");
        for i in 0..CAPACITY + 10 {
            cache.insert(format!("k{i}._domainkey.example.test").into(), txt(), later);
        }
        assert!(cache.len() <= CAPACITY);
    }
}
