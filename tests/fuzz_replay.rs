//! Replays every fuzz corpus file and every crash regression under `fuzz/` through
//! the same target functions AFL++ runs (`fuzz/src/lib.rs`), so CI checks in seconds
//! what the fuzzers found, on the stable toolchain and without instrumentation.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

fn replay(name: &str, target: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in [
        root.join("corpus").join(name),
        root.join("regressions").join(name),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap();
            let path = entry.path();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{} panics", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "no corpus for {name}");
}

#[test]
fn command() {
    replay("command", targets::command);
}

#[test]
fn data_reader() {
    replay("data_reader", targets::data_reader);
}

#[test]
fn bdat() {
    replay("bdat", targets::bdat);
}

#[test]
fn spf() {
    replay("spf", targets::spf);
}

#[test]
fn spf_eval() {
    replay("spf_eval", targets::spf_eval);
}

#[test]
fn proxy() {
    replay("proxy", targets::proxy);
}

#[test]
fn spool() {
    replay("spool", targets::spool);
}

#[test]
fn config() {
    replay("config", targets::config);
}

#[test]
fn header_fields() {
    replay("header_fields", targets::header_fields);
}

#[test]
fn dns_txt() {
    replay("dns_txt", targets::dns_txt);
}

#[test]
fn admin() {
    replay("admin", targets::admin);
}

#[test]
fn tracking_lines() {
    replay("tracking_lines", targets::tracking_lines);
}
