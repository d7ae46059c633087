//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/admin -o fuzz/out/admin target/debug/admin`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::admin(data);
    });
}
