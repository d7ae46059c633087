//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/data_reader -o fuzz/out/data_reader target/debug/data_reader`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::data_reader(data);
    });
}
