//! Sync before ack, shown by a system-call trace rather than by kill -9 (which cannot
//! see a missing sync: the page cache survives the process). The relay runs under
//! strace; for every `250 … queued as ID` written to a client socket, the spool write
//! holding that message's bytes and then an `fdatasync` of that same segment file must
//! have completed before the reply was written.

mod support;

use std::collections::HashMap;
use std::process::Command;

use support::*;

/// One traced system call, as strace -f -tt -yy prints it (or its completion, for
/// calls another thread interrupted: `<... fdatasync resumed>`).
#[derive(Debug)]
enum Call {
    /// A write to a spool segment: the path and the text of the buffer.
    SpoolWrite { path: String, text: String },
    /// A completed fdatasync/fsync of a file.
    Sync { path: String },
    /// A reply written to a socket.
    Reply { text: String },
}

fn fd_path(args: &str) -> Option<String> {
    let open = args.find('<')?;
    let close = args[open..].find('>')? + open;
    Some(args[open + 1..close].to_string())
}

/// Reads the trace in the order strace wrote it. `unfinished` calls are taken at their
/// completion (`resumed`), which is what "completed before" means.
fn parse(trace: &str) -> Vec<Call> {
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        // strace pads the PID column ("9703  01:12:01.83 ..."), so split on runs of
        // spaces, not on single ones.
        let Some((pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((_time, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let call = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), head.to_string());
            continue;
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let Some(head) = pending.remove(pid) else {
                continue;
            };
            let result = tail.split_once("resumed>").map_or("", |(_, r)| r);
            format!("{head}{result}")
        } else {
            rest.to_string()
        };
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        let failed = call
            .rsplit_once(" = ")
            .is_some_and(|(_, r)| r.starts_with('-'));
        if failed {
            continue;
        }
        let path = fd_path(args).unwrap_or_default();
        match name {
            "fdatasync" | "fsync" if path.ends_with(".seg") => out.push(Call::Sync { path }),
            "pwrite64" | "write" | "writev" | "pwritev" if path.ends_with(".seg") => {
                out.push(Call::SpoolWrite {
                    path,
                    text: args.to_string(),
                })
            }
            "write" | "writev" | "sendto" | "sendmsg" if path.starts_with("TCP:") => {
                out.push(Call::Reply {
                    text: args.to_string(),
                })
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_250_follows_the_sync_of_its_segment() {
    let dir = tmpdir("sync-trace");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()));
    let config = cfg.write();
    let trace = dir.join("trace.txt");
    let mut cmd = Command::new("strace");
    // pwrite64: the spool appends with positional writes; -s large enough for the IDs
    // inside a batch of records; -yy names each descriptor's file or socket.
    cmd.args([
        "-f",
        "-tt",
        "-yy",
        "-s",
        "1000000",
        "-e",
        "trace=fdatasync,fsync,write,writev,pwrite64,pwritev,sendto,sendmsg",
        "-o",
    ])
    .arg(&trace)
    .arg("--")
    .arg(bin())
    .args(["run", "--config"])
    .arg(&config)
    .args(["--log-format", "json"]);
    let mut relay = Relay::start_command(&dir, &config, cmd).expect("relay under strace");
    let addr = relay.smtp;
    let senders: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                let mut c = Smtp::connect(addr);
                c.greet();
                for i in 0..15 {
                    let r = c.mail(
                        "alice@example.test",
                        &["bob@partner.test"],
                        &format!("Subject: {t}-{i}\r\n\r\nbody {t} {i}"),
                    );
                    ids.push(queued_id(&r));
                }
                c.cmd("QUIT");
                ids
            })
        })
        .collect();
    let ids: Vec<String> = senders
        .into_iter()
        .flat_map(|s| s.join().unwrap())
        .collect();
    assert_eq!(ids.len(), 60);
    // SIGTERM goes to the relay under strace, not to strace; strace ends with it and
    // has then written the whole trace.
    let strace_pid = relay.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
            .unwrap_or_default();
    let traced = children
        .split_whitespace()
        .next()
        .expect("the traced relay");
    assert!(Command::new("kill")
        .args(["-TERM", traced])
        .status()
        .unwrap()
        .success());
    assert!(relay.stop().success());
    let text = std::fs::read_to_string(&trace).unwrap();
    let calls = parse(&text);
    let mut checked = 0;
    for id in &ids {
        let reply = calls
            .iter()
            .position(
                |c| matches!(c, Call::Reply { text } if text.contains(&format!("queued as {id}"))),
            )
            .unwrap_or_else(|| panic!("no 250 for {id} in the trace"));
        let write = calls[..reply]
            .iter()
            .position(|c| matches!(c, Call::SpoolWrite { text, .. } if text.contains(id.as_str())))
            .unwrap_or_else(|| panic!("{id}: 250 written before its bytes reached the spool"));
        let Call::SpoolWrite { path, .. } = &calls[write] else {
            unreachable!()
        };
        let synced = calls[write..reply]
            .iter()
            .any(|c| matches!(c, Call::Sync { path: p } if p == path));
        assert!(synced, "{id}: 250 written before {path} was synced");
        checked += 1;
    }
    assert_eq!(checked, 60);
}
