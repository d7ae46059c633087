//! AFL++ target: `cargo afl fuzz -i fuzz/corpus/dns_txt -o fuzz/out/dns_txt target/debug/dns_txt`
//! (see fuzz/README.md).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        smartrelay_fuzz::dns_txt(data);
    });
}
