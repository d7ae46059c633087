//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/header_fields -o fuzz/out/header_fields target/debug/header_fields`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::header_fields(data);
    });
}
