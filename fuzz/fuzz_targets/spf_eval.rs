//! AFL++ target: `fuzz/run.sh spf_eval` (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::spf_eval(data);
    });
}
