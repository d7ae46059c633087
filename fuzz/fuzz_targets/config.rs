//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/config -o fuzz/out/config target/debug/config`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::config(data);
    });
}
