//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/command -o fuzz/out/command target/debug/command`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::command(data);
    });
}
