//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/spool -o fuzz/out/spool target/debug/spool`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::spool(data);
    });
}
