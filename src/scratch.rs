//! Scratch directories for unit tests. Every test binary's go under one folder named by
//! its process id, and the folders of processes that are gone are removed when the next
//! run starts: stores opened inside helpers outlive any guard a test could hold, and a
//! suite run several times a day must not fill a disk shared with other jobs.

use std::path::{Path, PathBuf};
use std::sync::Once;

const PARENT: &str = "smartrelay-unit";

/// A fresh, empty directory for `name` in this process's folder.
pub fn dir(name: &str) -> PathBuf {
    static REAP: Once = Once::new();
    let parent = std::env::temp_dir().join(PARENT);
    REAP.call_once(|| reap(&parent));
    let d = parent.join(std::process::id().to_string()).join(name);
    let _ = std::fs::remove_dir_all(&d);
    if let Err(e) = std::fs::create_dir_all(&d) {
        panic!("scratch directory {}: {e}", d.display());
    }
    d
}

/// Removes the folders of earlier runs whose process no longer exists.
fn reap(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let alive = name
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
