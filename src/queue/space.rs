//! The free-space floor: how much room the spool's file system has left, and how
//! much the spool takes, against `queue.min_free` and `queue.max_size`.

use std::fmt;
use std::path::Path;

use crate::pipeline::Backpressure;

/// One measurement of the spool's room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceReport {
    /// Octets an unprivileged writer may still use; `None` when it cannot be read.
    pub free: Option<u64>,
    pub min_free: u64,
    pub size: u64,
    pub max_size: Option<u64>,
    pub refusing: Option<Backpressure>,
}

impl SpaceReport {
    pub fn measure(dir: &Path, size: u64, min_free: u64, max_size: Option<u64>) -> SpaceReport {
        let free = match available(dir) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the spool's free space");
                None
            }
        };
        SpaceReport::judge(free, min_free, size, max_size)
    }

    /// The decision alone, for a measurement already taken.
    pub fn judge(
        free: Option<u64>,
        min_free: u64,
        size: u64,
        max_size: Option<u64>,
    ) -> SpaceReport {
        let refusing = if free.is_some_and(|f| f < min_free) {
            Some(Backpressure::MinFree)
        } else if max_size.is_some_and(|m| size > m) {
            Some(Backpressure::MaxSize)
        } else {
            None
        };
        SpaceReport {
            free,
            min_free,
            size,
            max_size,
            refusing,
        }
    }

    pub fn publish(&self) {
        if let Some(f) = self.free {
            metrics::gauge!(crate::telemetry::SPOOL_FREE_BYTES).set(f as f64);
        }
        metrics::gauge!(crate::telemetry::QUEUE_ACCEPTING).set(if self.refusing.is_some() {
            0.0
        } else {
            1.0
        });
    }
}

impl fmt::Display for SpaceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.refusing {
            Some(Backpressure::MinFree) => write!(
                f,
                "spool file system has {} octets free, under queue.min_free = {}",
                self.free.unwrap_or(0),
                self.min_free
            ),
            Some(Backpressure::MaxSize) => write!(
                f,
                "spool takes {} octets, over queue.max_size = {}",
                self.size,
                self.max_size.unwrap_or(0)
            ),
            _ => write!(f, "spool takes {} octets", self.size),
        }
    }
}

/// `statvfs(2)`: the octets available to an unprivileged writer.
fn available(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is plain data the
    // call fills in, and it is read only when the call succeeds.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        st
    };
    // Both are `c_ulong`: u64 on the 64-bit targets this relay is built for.
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_and_cap() {
        let ok = SpaceReport::judge(Some(5 << 30), 1 << 30, 10, None);
        assert_eq!(ok.refusing, None);
        let low = SpaceReport::judge(Some(1 << 20), 1 << 30, 10, None);
        assert_eq!(low.refusing, Some(Backpressure::MinFree));
        assert!(low.to_string().contains("queue.min_free"));
        let full = SpaceReport::judge(Some(5 << 30), 1 << 30, 2000, Some(1000));
        assert_eq!(full.refusing, Some(Backpressure::MaxSize));
        // Unreadable free space does not refuse mail on its own.
        assert_eq!(SpaceReport::judge(None, 1 << 30, 1, None).refusing, None);
    }

    #[test]
    fn this_file_system_has_room() {
        assert!(available(&std::env::temp_dir()).unwrap() > 0);
    }
}
