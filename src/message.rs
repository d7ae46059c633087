//! A message's octets on their way from a session to the spool: in memory when small,
//! or, once a body grows past what a session may hold (`server.ingress_memory`), in a
//! file beside the spool that the spool copies from. Shared by ingress (which fills it),
//! the seam to the queue and the spool (which stores it).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// A body received into a file: removed with the last handle to it, whatever became of
/// the message (queued, refused, the session gone).
#[derive(Debug)]
pub struct Spill {
    file: File,
    path: PathBuf,
    len: u64,
    /// CRC-32 of the content, taken as it was written, so the spool's record checksum
    /// does not read the file once more.
    crc: crc32fast::Hasher,
}

impl Spill {
    /// Takes over a file written to `len` octets whose checksum is `crc`.
    pub fn new(file: File, path: PathBuf, len: u64, crc: crc32fast::Hasher) -> Spill {
        Spill {
            file,
            path,
            len,
            crc,
        }
    }

    pub fn crc(&self) -> &crc32fast::Hasher {
        &self.crc
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `buf.len()` octets at `at`.
    pub fn read_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, at)
    }

    /// The whole file in memory (for a check that needs every octet at once).
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        let len = usize::try_from(self.len).map_err(std::io::Error::other)?;
        let mut out = vec![0u8; len];
        self.file.read_exact_at(&mut out, 0)?;
        Ok(out)
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the spool is handed for one message.
#[derive(Debug, Clone)]
pub enum Data {
    /// All of it in memory: our trace header and the client's octets (or what the relay
    /// composed itself).
    Memory(Bytes),
    /// Our trace header in memory, then the client's octets in a file.
    Spilled {
        prefix: Bytes,
        file: std::sync::Arc<Spill>,
    },
}

impl Data {
    pub fn len(&self) -> u64 {
        match self {
            Data::Memory(b) => b.len() as u64,
            Data::Spilled { prefix, file } => prefix.len() as u64 + file.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole message in memory (test doubles, and small files).
    pub fn to_bytes(&self) -> std::io::Result<Bytes> {
        match self {
            Data::Memory(b) => Ok(b.clone()),
            Data::Spilled { prefix, file } => {
                let mut out = Vec::with_capacity(self.len() as usize);
                out.extend_from_slice(prefix);
                out.extend_from_slice(&file.read_all()?);
                Ok(Bytes::from(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spill_reads_back_and_goes_with_its_last_handle() {
        let dir = crate::scratch::dir("spill");
        let path = dir.join("m");
        std::fs::write(&path, b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let file = File::open(&path).unwrap();
        let mut crc = crc32fast::Hasher::new();
        crc.update(b"Subject: x\r\n\r\nbody\r\n");
        let spill = std::sync::Arc::new(Spill::new(file, path.clone(), 20, crc));
        let data = Data::Spilled {
            prefix: Bytes::from_static(b"Received: r\r\n"),
            file: spill.clone(),
        };
        assert_eq!(data.len(), 33);
        assert_eq!(
            &data.to_bytes().unwrap()[..],
            b"Received: r\r\nSubject: x\r\n\r\nbody\r\n"
        );
        drop(data);
        assert!(path.exists(), "a handle is left");
        drop(spill);
        assert!(!path.exists());
    }
}
