//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/proxy -o fuzz/out/proxy target/debug/proxy`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::proxy(data);
    });
}
