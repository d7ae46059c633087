//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/spf -o fuzz/out/spf target/debug/spf`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::spf(data);
    });
}
