//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/tracking_lines -o fuzz/out/tracking_lines target/debug/tracking_lines`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::tracking_lines(data);
    });
}
