//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/bdat -o fuzz/out/bdat target/debug/bdat`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::bdat(data);
    });
}
