//! The SPF record both benchmarks parse: about 450 octets, the size at which records
//! start to risk UDP truncation (three includes, then `ip4` terms).

pub fn record_450() -> String {
    let mut rec = String::from("v=spf1 include:eu._netblocks.mimecast.com include:spf.protection.outlook.com include:_spf.google.com");
    let mut i = 0;
    while rec.len() < 440 {
        rec.push_str(&format!(" ip4:192.0.{i}.0/24"));
        i += 1;
    }
    rec.push_str(" -all");
    rec
}
