//! RFC 7208 `check_host()` over a real DNS server: each case is a rule of the RFC (the
//! section is named), checked through the library's evaluator and, for the command's
//! contract (flags, JSON, exit codes), through `smartrelay spf eval`.

mod support;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use smartrelay::spf::eval::{Evaluation, Query, SpfResult};
use smartrelay::spf::hickory::HickoryDns;
use smartrelay::spf::SpfService;
use support::dns::Dns;

/// One zone for every case. Names with "slow" are never answered by the test server.
const ZONE: &str = r#"
; §4.5 record selection
plain           IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
soft            IN TXT "v=spf1 ip4:192.0.2.0/24 ~all"
question        IN TXT "v=spf1 ?all"
nomatch         IN TXT "v=spf1 ip4:192.0.2.1"
empty           IN TXT "v=spf1"
nospf           IN A 192.0.2.1
other-txt       IN TXT "google-site-verification=abc"
other-txt       IN TXT "v=spf10 +all"
other-txt       IN TXT "v=spf1 -all"
two-records     IN TXT "v=spf1 +all"
two-records     IN TXT "v=spf1 -all"
upper           IN TXT "V=SpF1 -ALL"
joined          IN TXT "v=spf1 ip4:192.0.2.0/24" " -all"
nospace         IN TXT "v=spf1" "+all"
nonascii        IN TXT "v=spf1 a:\195\169t\195\169.example.com -all"
spaces          IN TXT "v=spf1   ip4:192.0.2.0/24    -all   "
trailing-after  IN TXT "v=spf1 ip4:192.0.2.0/24 -all bogus:x"
unknown-mod     IN TXT "v=spf1 moo.cow-far_out=man:dog/cat ip4:192.0.2.0/24 -all"
bad-mod-name    IN TXT "v=spf1 9lives=x -all"
bad-mod-macro   IN TXT "v=spf1 -all note=%x"
alias-txt       IN CNAME plain.example.com.

; §5.1 all, §5.6 ip4/ip6
all-arg         IN TXT "v=spf1 -all:foo"
all-cidr        IN TXT "v=spf1 -all/8"
v6              IN TXT "v=spf1 ip6:2001:db8:1234::/48 -all"
v6-zero         IN TXT "v=spf1 ip6:::/0 ?all"
mapped          IN TXT "v=spf1 -ip4:192.0.2.7 +all"
ip4-long        IN TXT "v=spf1 ip4:192.0.2.0/33 -all"
ip4-zero-lead   IN TXT "v=spf1 ip4:192.0.2.0/024 -all"
ip4-dual        IN TXT "v=spf1 ip4:192.0.2.0//32 -all"
ip4-short       IN TXT "v=spf1 ip4:192.0.2 -all"
ip6-bare        IN TXT "v=spf1 -all ip6"

; §5.3 a, with dual CIDR
a-self          IN TXT "v=spf1 a -all"
a-self          IN A 192.0.2.20
a-self          IN AAAA 2001:db8::20
a-cidr          IN TXT "v=spf1 a:host.example.com/24 -all"
a-dual          IN TXT "v=spf1 a:host.example.com/32//64 -all"
host            IN A 198.51.100.10
host            IN AAAA 2001:db8:5::10
a-colon         IN TXT "v=spf1 a:odd:name/x.example.com -all"
@raw	odd:name/x	A	192.0.2.30
a-toplabel      IN TXT "v=spf1 a:museum -all"
; An empty TXT record beside the policy (no character-string at all).
null-text       IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
@raw	null-text	TXT	
a-numeric       IN TXT "v=spf1 a:192.0.2.1 -all"
a-dash-top      IN TXT "v=spf1 a:host.xn--p1ai -all"
a-bad-dash      IN TXT "v=spf1 a:host.example.-com -all"
a-empty         IN TXT "v=spf1 a: -all"
a-cname         IN TXT "v=spf1 a:alias.example.com -all"
alias           IN CNAME host.example.com.
a-slow          IN TXT "v=spf1 a:slow.example.com -all"

; §5.4 mx
mx-self         IN TXT "v=spf1 mx -all"
mx-self         IN MX 10 mx1.example.com.
mx-self         IN MX 20 mx2.example.com.
mx1             IN A 203.0.113.1
mx2             IN A 203.0.113.2
mx-colon        IN TXT "v=spf1 mx:odd:mx/y.example.com -all"
@raw	odd:mx/y	MX	10 odd:mx/y
@raw	odd:mx/y	A	192.0.2.31
mx-cidr         IN TXT "v=spf1 mx/24 -all"
mx-cidr         IN MX 10 mx1.example.com.
mx-no-mx        IN TXT "v=spf1 mx"
mx-no-mx        IN A 192.0.2.40
mx-null         IN TXT "v=spf1 mx"
mx-null         IN MX 0 .
mx-many         IN TXT "v=spf1 mx"
mx-many         IN MX 1 m1.example.com.
mx-many         IN MX 2 m2.example.com.
mx-many         IN MX 3 m3.example.com.
mx-many         IN MX 4 m4.example.com.
mx-many         IN MX 5 m5.example.com.
mx-many         IN MX 6 m6.example.com.
mx-many         IN MX 7 m7.example.com.
mx-many         IN MX 8 m8.example.com.
mx-many         IN MX 9 m9.example.com.
mx-many         IN MX 10 m10.example.com.
mx-many         IN MX 11 mx1.example.com.

; §5.5 ptr
ptr-self        IN TXT "v=spf1 ptr -all"
ptr-target      IN TXT "v=spf1 ptr:ptr.example.com -all"
mail.ptr        IN A 192.0.2.50
mail.ptr        IN AAAA 2001:db8::50
ptr-nope        IN TXT "v=spf1 ptr:nowhere.example.com -all"
ptr-cidr        IN TXT "v=spf1 ptr/24 -all"

; §5.7 exists
exists          IN TXT "v=spf1 exists:%{i}.bl.example.com -all"
192.0.2.9.bl    IN A 127.0.0.2
exists-v6       IN TXT "v=spf1 exists:v6.example.com -all"
v6only          IN AAAA 2001:db8::1
exists-v6-none  IN TXT "v=spf1 exists:v6only.example.com -all"
v6              IN A 127.0.0.2
exists-slow     IN TXT "v=spf1 exists:slow.example.com -all"
exists-cidr     IN TXT "v=spf1 exists:bl.example.com/24 -all"

; §5.2 include
inc-pass        IN TXT "v=spf1 include:plain.example.com -all"
inc-fail        IN TXT "v=spf1 include:plain.example.com ~all"
inc-neutral     IN TXT "v=spf1 include:question.example.com -all"
inc-none        IN TXT "v=spf1 include:nospf.example.com -all"
inc-nx          IN TXT "v=spf1 include:gone.example.com -all"
inc-perm        IN TXT "v=spf1 include:two-records.example.com -all"
inc-temp        IN TXT "v=spf1 include:slow.example.com -all"
inc-neg         IN TXT "v=spf1 -include:plain.example.com +all"
inc-dot         IN TXT "v=spf1 include:plain.example.com. -all"
inc-cidr        IN TXT "v=spf1 include:plain.example.com/24 -all"

; §6.1 redirect
redir           IN TXT "v=spf1 redirect=plain.example.com"
redir-all       IN TXT "v=spf1 ?all redirect=plain.example.com"
redir-after     IN TXT "v=spf1 ip4:198.51.100.99 redirect=plain.example.com"
redir-none      IN TXT "v=spf1 redirect=nospf.example.com"
redir-loop      IN TXT "v=spf1 redirect=redir-loop.example.com"
redir-twice     IN TXT "v=spf1 redirect=plain.example.com redirect=soft.example.com"
redir-macro     IN TXT "v=spf1 redirect=%{d}.r.example.com."
redir-macro.example.com.r IN TXT "v=spf1 ip4:192.0.2.0/24 -all"

; §6.2 exp
exp             IN TXT "v=spf1 -all exp=why.example.com"
why             IN TXT "%{i} is not one of %{d}'s designated mail servers."
exp-letters     IN TXT "v=spf1 -all exp=letters.example.com"
letters         IN TXT "c=%{c} r=%{r} v=%{v} t=%{t} l=%{l} o=%{o} h=%{h}"
exp-two         IN TXT "v=spf1 -all exp=twotxt.example.com"
twotxt          IN TXT "one"
twotxt          IN TXT "two"
exp-none        IN TXT "v=spf1 -all exp=gone.example.com"
exp-bad         IN TXT "v=spf1 -all exp=badtext.example.com"
badtext         IN TXT "The %{x}-files."
exp-timeout     IN TXT "v=spf1 -all exp=slow.example.com"
exp-empty       IN TXT "v=spf1 exp= -all"
exp-twice       IN TXT "v=spf1 exp=why.example.com -all exp=why.example.com"
exp-crt-out     IN TXT "v=spf1 -all exp=%{r}.example.com"
exp-inc         IN TXT "v=spf1 include:exp.example.com -all exp=outer.example.com"
outer           IN TXT "outer says no"
exp-redir       IN TXT "v=spf1 exp=outer.example.com redirect=exp.example.com"
exp-upper       IN TXT "v=spf1 -all exp=whyupper.%{D2}"
whyupper        IN TXT "see http://example.com/why?l=%{L}"
exp-trunc       IN TXT "v=spf1 -all exp=x.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.example.com"
exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com.exp-trunc.example.com IN TXT "cut to fit"

; §7 macros
m-local         IN TXT "v=spf1 exists:%{lr-}.u.%{d2} -all"
m-local1        IN TXT "v=spf1 exists:%{l1r-}.one.%{d2} -all"
jones.one       IN A 127.0.0.2
m-helo          IN TXT "v=spf1 a:%{h} -all"
m-helo-esc      IN TXT "v=spf1 a:%{H} -all"
m-v6            IN TXT "v=spf1 exists:%{ir}.%{v}.x.%{d2} -all"
m-p             IN TXT "v=spf1 -all exp=pexp.example.com"
pexp            IN TXT "connect from %{p}"
m-p-exists      IN TXT "v=spf1 exists:%{p}.okp.%{d2} -all"
mail.ptr.example.com.okp IN A 127.0.0.2
m-bad-letter    IN TXT "v=spf1 exists:%{q}.example.com -all"
m-bad-escape    IN TXT "v=spf1 exists:%(i).example.com -all"
m-trailing      IN TXT "v=spf1 exists:foo%.example.com -all"
m-crt-outside   IN TXT "v=spf1 exists:%{t}.example.com -all"
m-escapes       IN TXT "v=spf1 a:pct%%sp%_dash%-x.example.com -all"
@raw	pct%sp dash%20x	A	192.0.2.7
m-multi         IN TXT "v=spf1 exists:%{l-+}.multi.%{d2} -all"
a.b.c.multi     IN A 127.0.0.2
2.2.0.192.in-addr.x IN A 127.0.0.2
1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.x IN A 127.0.0.2
bob.jones.u     IN A 127.0.0.2

; §4.6.4 limits
lim-10          IN TXT "v=spf1 a a a a a a a a a a ip4:192.0.2.0/24 -all"
lim-10          IN A 198.51.100.1
lim-11          IN TXT "v=spf1 a a a a a a a a a a a ip4:192.0.2.0/24 -all"
lim-11          IN A 198.51.100.1
lim-early       IN TXT "v=spf1 ip4:192.0.2.0/24 a a a a a a a a a a a -all"
lim-early       IN A 198.51.100.1
lim-nested      IN TXT "v=spf1 a include:lim-inner.example.com a ip4:192.0.2.0/24 -all"
lim-nested      IN A 198.51.100.1
lim-inner       IN TXT "v=spf1 a a a a a a a a"
lim-inner       IN A 198.51.100.1
void-2          IN TXT "v=spf1 a:gone1.example.com a:gone2.example.com ?all"
void-3          IN TXT "v=spf1 a:gone1.example.com a:gone2.example.com a:gone3.example.com ?all"
void-exp        IN TXT "v=spf1 a:gone1.example.com a:gone2.example.com exp=gone3.example.com -all"
many-a          IN TXT "v=spf1 a -all"
many-a          IN A 198.51.100.1
many-a          IN A 198.51.100.2
many-a          IN A 198.51.100.3
many-a          IN A 198.51.100.4
many-a          IN A 198.51.100.5
many-a          IN A 198.51.100.6
many-a          IN A 198.51.100.7
many-a          IN A 198.51.100.8
many-a          IN A 198.51.100.9
many-a          IN A 198.51.100.10
many-a          IN A 198.51.100.11
many-a          IN A 198.51.100.12
"#;

/// PTR data: 192.0.2.50 and 2001:db8::50 name mail.ptr.example.com (which has those
/// addresses); 192.0.2.51 names it too, but the name does not give .51 back.
const REVERSE4: &str = r#"
50  IN PTR mail.ptr.example.com.
51  IN PTR mail.ptr.example.com.
"#;

const REVERSE6: &str = "0.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 IN PTR mail.ptr.example.com.\n";

struct Lab {
    dns: Dns,
    rt: tokio::runtime::Runtime,
}

impl Lab {
    fn start() -> Lab {
        let dns = Dns::start(&[
            ("example.com", ZONE),
            ("2.0.192.in-addr.arpa", REVERSE4),
            ("0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", REVERSE6),
            ("xn--p1ai", "host IN A 192.0.2.7\n"),
            // The root, so that a name outside the zones above is NXDOMAIN, as on the
            // Internet, and not refused.
            (".", ""),
        ]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Lab { dns, rt }
    }

    fn eval(&self, ip: &str, sender: &str, helo: &str) -> Evaluation {
        let dns = HickoryDns::new(&[self.dns.addr], Duration::from_millis(500)).unwrap();
        let service = SpfService::new(dns, Duration::from_secs(20));
        let query = Query {
            ip: ip.parse::<IpAddr>().unwrap(),
            sender: sender.into(),
            helo: helo.into(),
            receiver: "relay.example.net".into(),
            timestamp: 1_700_000_000,
        };
        self.rt.block_on(service.evaluate(&query))
    }

    /// The result for `user@<name>.example.com` from `ip`.
    fn result(&self, name: &str, ip: &str) -> SpfResult {
        self.eval(ip, &format!("user@{name}.example.com"), "mail.example.net")
            .result
    }
}

use SpfResult::*;

/// Runs cases `(name, ip, expected)` and reports every mismatch at once.
fn expect_all(lab: &Lab, cases: &[(&str, &str, SpfResult)]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(name, ip, want)| {
            let got = lab.eval(ip, &format!("user@{name}.example.com"), "mail.example.net");
            (got.result != *want).then(|| format!("{name} from {ip}: want {want}, got {got:?}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn record_selection_and_syntax() {
    let lab = Lab::start();
    expect_all(
        &lab,
        &[
            // §4.6.2, §2.6: the matching qualifier is the result.
            ("plain", "192.0.2.7", Pass),
            ("plain", "198.51.100.7", Fail),
            ("soft", "198.51.100.7", SoftFail),
            ("question", "198.51.100.7", Neutral),
            // §4.7: nothing matched and no redirect: neutral.
            ("nomatch", "198.51.100.7", Neutral),
            ("empty", "198.51.100.7", Neutral),
            // §4.5: no SPF record, or no such domain.
            ("nospf", "192.0.2.7", None),
            ("gone", "192.0.2.7", None),
            // Other TXT records (and v=spf10) are not SPF records.
            ("other-txt", "192.0.2.7", Fail),
            // §4.5: two SPF records are a permerror.
            ("two-records", "192.0.2.7", PermError),
            ("upper", "192.0.2.7", Fail),
            // §3.3: the strings of one TXT record are joined without spaces.
            ("joined", "192.0.2.7", Pass),
            ("nospace", "192.0.2.7", None),
            // §3.1, §4.6: records are ASCII; any syntax error anywhere is a permerror.
            ("nonascii", "192.0.2.7", PermError),
            ("spaces", "192.0.2.7", Pass),
            ("trailing-after", "192.0.2.7", PermError),
            // §6: unknown modifiers are ignored, but must be well-formed.
            ("unknown-mod", "192.0.2.7", Pass),
            ("bad-mod-name", "192.0.2.7", PermError),
            ("bad-mod-macro", "192.0.2.7", PermError),
            // A CNAME at the domain is followed.
            ("alias-txt", "192.0.2.7", Pass),
            // §4.5: a TXT record with no character-string is just not an SPF record.
            ("null-text", "192.0.2.7", Pass),
            ("null-text", "198.51.100.7", Fail),
            ("all-arg", "192.0.2.7", PermError),
            ("all-cidr", "192.0.2.7", PermError),
        ],
    );
}

#[test]
fn ip_mechanisms_and_address_families() {
    let lab = Lab::start();
    expect_all(
        &lab,
        &[
            ("v6", "2001:db8:1234::5", Pass),
            ("v6", "2001:db8:9999::5", Fail),
            // An IPv4 client never matches ip6, even ::/0.
            ("v6", "192.0.2.7", Fail),
            ("v6-zero", "192.0.2.7", Neutral),
            ("v6-zero", "2001:db8::1", Pass),
            // §5: an IPv4-mapped IPv6 client is checked as IPv4.
            ("mapped", "::ffff:192.0.2.7", Fail),
            ("mapped", "::ffff:192.0.2.8", Pass),
            ("ip4-long", "192.0.2.7", PermError),
            ("ip4-zero-lead", "192.0.2.7", PermError),
            ("ip4-dual", "192.0.2.7", PermError),
            ("ip4-short", "192.0.2.7", PermError),
            ("ip6-bare", "192.0.2.7", PermError),
        ],
    );
}

#[test]
fn a_mx_ptr_exists() {
    let lab = Lab::start();
    expect_all(
        &lab,
        &[
            // §5.3: A for IPv4 clients, AAAA for IPv6, with the dual CIDR lengths.
            ("a-self", "192.0.2.20", Pass),
            ("a-self", "2001:db8::20", Pass),
            ("a-self", "192.0.2.21", Fail),
            ("a-cidr", "198.51.100.200", Pass),
            ("a-cidr", "198.51.101.1", Fail),
            ("a-dual", "198.51.100.11", Fail),
            ("a-dual", "2001:db8:5::ffff", Pass),
            ("a-dual", "2001:db8:6::1", Fail),
            // §7.1: a domain-spec may hold any visible character but in its top label.
            ("a-colon", "192.0.2.30", Pass),
            // ... and so may the names DNS returns: an MX exchange `odd:mx/y`.
            ("mx-colon", "192.0.2.31", Pass),
            ("mx-colon", "::ffff:192.0.2.31", Pass),
            ("mx-colon", "192.0.2.32", Fail),
            ("a-toplabel", "192.0.2.7", PermError),
            ("a-numeric", "192.0.2.1", PermError),
            ("a-dash-top", "192.0.2.7", Pass),
            ("a-bad-dash", "192.0.2.7", PermError),
            ("a-empty", "192.0.2.7", PermError),
            ("a-cname", "198.51.100.10", Pass),
            // §2.6.7: a DNS failure is a temperror.
            ("a-slow", "192.0.2.7", TempError),
            // §5.4: the exchanges' addresses; no MX is no match (not an A fallback).
            ("mx-self", "203.0.113.2", Pass),
            ("mx-self", "203.0.113.3", Fail),
            ("mx-cidr", "203.0.113.200", Pass),
            ("mx-no-mx", "192.0.2.40", Neutral),
            ("mx-null", "192.0.2.40", Neutral),
            // §4.6.4: more than 10 MX names is a permerror.
            ("mx-many", "203.0.113.1", PermError),
            // §5.5: validated PTR names within the target.
            ("ptr-self", "192.0.2.50", Fail),
            ("ptr-target", "192.0.2.50", Pass),
            ("ptr-target", "2001:db8::50", Pass),
            ("ptr-target", "192.0.2.51", Fail),
            ("ptr-nope", "192.0.2.50", Fail),
            ("ptr-cidr", "192.0.2.50", PermError),
            // §5.7: exists asks for A records, whatever the client's family.
            ("exists", "192.0.2.9", Pass),
            ("exists", "192.0.2.10", Fail),
            ("exists-v6", "2001:db8::77", Pass),
            ("exists-v6-none", "2001:db8::1", Fail),
            ("exists-slow", "192.0.2.7", TempError),
            ("exists-cidr", "192.0.2.7", PermError),
        ],
    );
}

#[test]
fn include_and_redirect() {
    let lab = Lab::start();
    expect_all(
        &lab,
        &[
            // §5.2: pass matches; fail, softfail and neutral do not; none and
            // permerror are a permerror; temperror stays a temperror.
            ("inc-pass", "192.0.2.7", Pass),
            ("inc-fail", "198.51.100.7", SoftFail),
            ("inc-neutral", "198.51.100.7", Fail),
            ("inc-none", "192.0.2.7", PermError),
            ("inc-nx", "192.0.2.7", PermError),
            ("inc-perm", "192.0.2.7", PermError),
            ("inc-temp", "192.0.2.7", TempError),
            ("inc-neg", "192.0.2.7", Fail),
            ("inc-neg", "198.51.100.7", Pass),
            ("inc-dot", "192.0.2.7", Pass),
            ("inc-cidr", "192.0.2.7", PermError),
            // §6.1: redirect applies after the mechanisms, and not when there is `all`.
            ("redir", "192.0.2.7", Pass),
            ("redir", "198.51.100.7", Fail),
            ("redir-all", "198.51.100.7", Neutral),
            ("redir-after", "198.51.100.99", Pass),
            ("redir-none", "192.0.2.7", PermError),
            ("redir-loop", "192.0.2.7", PermError),
            ("redir-twice", "192.0.2.7", PermError),
            ("redir-macro", "192.0.2.7", Pass),
        ],
    );
}

#[test]
fn limits_count_across_the_whole_evaluation() {
    let lab = Lab::start();
    expect_all(
        &lab,
        &[
            ("lim-10", "192.0.2.7", Pass),
            ("lim-11", "192.0.2.7", PermError),
            // Limits are met during evaluation: an early match never reaches them.
            ("lim-early", "192.0.2.7", Pass),
            ("lim-nested", "192.0.2.7", PermError),
            ("void-2", "192.0.2.7", Neutral),
            ("void-3", "192.0.2.7", PermError),
            // The exp lookup does not count as a void lookup.
            ("void-exp", "192.0.2.7", Fail),
            // There is no limit on the A records of one name.
            ("many-a", "198.51.100.12", Pass),
        ],
    );
    let e = lab.eval("192.0.2.7", "x@lim-10.example.com", "h.example.net");
    assert_eq!((e.lookups, e.void_lookups), (10, 0));
    let e = lab.eval("192.0.2.7", "x@void-2.example.com", "h.example.net");
    assert_eq!((e.lookups, e.void_lookups), (2, 2));
    assert_eq!(e.mechanism.as_deref(), Some("?all"));
}

#[test]
fn initial_processing_of_the_identity() {
    let lab = Lab::start();
    let r = |sender: &str, helo: &str| lab.eval("192.0.2.7", sender, helo).result;
    // §4.3: a malformed domain is "none", never a query.
    assert_eq!(r("x@a..example.com", "h.example.net"), None);
    let long = format!("x@{}.example.com", "a".repeat(64));
    assert_eq!(r(&long, "h.example.net"), None);
    assert_eq!(r("x@[192.0.2.7]", "h.example.net"), None);
    assert_eq!(r("x@localhost", "h.example.net"), None);
    // A 63-octet label is fine (and has no record here).
    let ok = format!("x@{}.example.com", "a".repeat(63));
    assert_eq!(r(&ok, "h.example.net"), None);
    // §2.4: the null sender is checked as postmaster@<helo>.
    let e = lab.eval("198.51.100.7", "", "plain.example.com");
    assert_eq!((e.result, e.domain.as_str()), (Fail, "plain.example.com"));
    assert_eq!(r("", "A2345678"), None);
    // A trailing dot on the domain is ignored.
    assert_eq!(r("x@plain.example.com.", "h.example.net"), Pass);
}

#[test]
fn explanations() {
    let lab = Lab::start();
    let exp = |ip: &str, name: &str| {
        let e = lab.eval(ip, &format!("jo@{name}.example.com"), "mail.example.net");
        assert_eq!(e.result, Fail, "{name}: {e:?}");
        e.explanation
    };
    // §6.2: exp= is fetched and expanded, with the current domain as %{d}.
    assert_eq!(
        exp("198.51.100.7", "exp"),
        "198.51.100.7 is not one of exp.example.com's designated mail servers."
    );
    // §7.3: c, r and t are allowed in explanations; v is in-addr or ip6.
    assert_eq!(
        exp("2001:db8::7", "exp-letters"),
        "c=2001:db8::7 r=relay.example.net v=ip6 t=1700000000 l=jo o=exp-letters.example.com h=mail.example.net"
    );
    // Uppercase letters are URL-escaped.
    let e = lab.eval(
        "198.51.100.7",
        "jack&jill=up@exp-upper.example.com",
        "h.example.net",
    );
    assert_eq!(
        e.explanation,
        "see http://example.com/why?l=jack%26jill%3Dup"
    );
    // No usable exp text: the default explanation.
    let default = "exp-two.example.com does not designate 198.51.100.7 as a permitted sender";
    assert_eq!(exp("198.51.100.7", "exp-two"), default);
    for name in ["exp-none", "exp-bad", "exp-timeout", "plain"] {
        assert_eq!(
            exp("198.51.100.7", name),
            default.replace("exp-two", name),
            "{name}"
        );
    }
    // An include's exp is not used; the including record's is.
    assert_eq!(exp("198.51.100.7", "exp-inc"), "outer says no");
    // Through a redirect, the target's exp is used, not the original's.
    assert!(
        exp("198.51.100.7", "exp-redir").ends_with("exp.example.com's designated mail servers.")
    );
    // §7.3: a name longer than 253 octets loses labels on the left until it fits.
    assert_eq!(exp("198.51.100.7", "exp-trunc"), "cut to fit");
    // An explicit empty exp=, a second exp, and c/r/t outside exp are syntax errors.
    for name in ["exp-empty", "exp-twice", "exp-crt-out"] {
        assert_eq!(lab.result(name, "198.51.100.7"), PermError, "{name}");
    }
    // Explanations only come with fail.
    assert_eq!(
        lab.eval("192.0.2.7", "x@plain.example.com", "h")
            .explanation,
        ""
    );
}

#[test]
fn macros() {
    let lab = Lab::start();
    // %{lr-}: the local part split on '-', reversed, joined with dots; %{l1r-} keeps
    // the rightmost part after the reversal; %{d2} the last two labels of the domain.
    let r = |sender: &str| lab.eval("192.0.2.7", sender, "h.example.net").result;
    assert_eq!(r("jones-bob@m-local.example.com"), Pass);
    assert_eq!(r("bob-jones@m-local.example.com"), Fail);
    assert_eq!(r("jones-bob@m-local1.example.com"), Pass);
    assert_eq!(r("bob-jones@m-local1.example.com"), Fail);
    // Multiple delimiters: a-b+c → a.b.c.
    let e = lab.eval("192.0.2.7", "a-b+c@m-multi.example.com", "h.example.net");
    assert_eq!(e.result, Pass, "{e:?}");
    // %{h}: the HELO name; escaped with %{H} a literal is no name, so no match.
    assert_eq!(
        lab.eval("198.51.100.10", "x@m-helo.example.com", "host.example.com")
            .result,
        Pass
    );
    assert_eq!(
        lab.eval("198.51.100.10", "x@m-helo.example.com", "[192.0.2.1]")
            .result,
        Fail
    );
    assert_eq!(
        lab.eval(
            "198.51.100.10",
            "x@m-helo-esc.example.com",
            "JUMPIN' JUPITER"
        )
        .result,
        Fail
    );
    // %{ir}.%{v}: reversed address, in-addr or ip6 (nibbles for IPv6).
    assert_eq!(lab.result("m-v6", "192.0.2.2"), Pass);
    assert_eq!(lab.result("m-v6", "192.0.2.3"), Fail);
    assert_eq!(lab.result("m-v6", "2001:db8::1"), Pass);
    // %{p}: the validated name, else "unknown".
    let p = |ip: &str| {
        lab.eval(ip, "x@m-p.example.com", "h.example.net")
            .explanation
    };
    assert_eq!(p("192.0.2.50"), "connect from mail.ptr.example.com");
    assert_eq!(p("192.0.2.51"), "connect from unknown");
    assert_eq!(p("2001:db8::50"), "connect from mail.ptr.example.com");
    assert_eq!(lab.result("m-p-exists", "192.0.2.50"), Pass);
    assert_eq!(lab.result("m-p-exists", "192.0.2.51"), Fail);
    // Bad macros are syntax errors.
    for name in [
        "m-bad-letter",
        "m-bad-escape",
        "m-trailing",
        "m-crt-outside",
    ] {
        assert_eq!(lab.result(name, "192.0.2.7"), PermError, "{name}");
    }
    // %% is a percent sign, %_ a space, %- an escaped space.
    assert_eq!(lab.result("m-escapes", "192.0.2.7"), Pass);
    assert_eq!(lab.result("m-escapes", "192.0.2.8"), Fail);
}

// ---------------------------------------------------------------- the command

fn spf_eval(dns: &Dns, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(support::bin())
        .args([
            "spf",
            "eval",
            "--nameserver",
            &dns.addr.to_string(),
            "--timeout",
            "1s",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn command_json_text_and_exit_codes() {
    let lab = Lab::start();
    let (code, out, _) = spf_eval(
        &lab.dns,
        &[
            "--ip",
            "198.51.100.7",
            "--sender",
            "jo@exp.example.com",
            "--json",
        ],
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["result"], "fail");
    assert_eq!(
        v["explanation"],
        "198.51.100.7 is not one of exp.example.com's designated mail servers."
    );
    assert_eq!(v["mechanism"], "-all");
    assert_eq!(v["domain"], "exp.example.com");
    assert_eq!(v["lookups"], 0);
    assert_eq!(v["void_lookups"], 0);

    // Text: the result, and the explanation for a fail.
    let (code, out, _) = spf_eval(
        &lab.dns,
        &["--ip", "192.0.2.7", "--sender", "jo@plain.example.com"],
    );
    assert_eq!((code, out.trim()), (0, "pass"));
    let (code, out, _) = spf_eval(
        &lab.dns,
        &["--ip", "198.51.100.7", "--sender", "jo@exp.example.com"],
    );
    assert_eq!(code, 0);
    assert_eq!(out.lines().next(), Some("fail"));
    assert!(out.contains("designated mail servers"), "{out}");

    // Nothing matched: mechanism null.
    let (_, out, _) = spf_eval(
        &lab.dns,
        &[
            "--ip",
            "198.51.100.7",
            "--sender",
            "jo@nomatch.example.com",
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["result"].as_str(), v["mechanism"].is_null()),
        (Some("neutral"), true)
    );

    // Every result exits 0, a temperror included.
    let (code, out, _) = spf_eval(
        &lab.dns,
        &["--ip", "192.0.2.7", "--sender", "jo@a-slow.example.com"],
    );
    assert_eq!((code, out.trim()), (0, "temperror"));
    let (code, out, _) = spf_eval(
        &lab.dns,
        &[
            "--ip",
            "192.0.2.7",
            "--sender",
            "jo@two-records.example.com",
        ],
    );
    assert_eq!((code, out.trim()), (0, "permerror"));

    // The null sender is the HELO identity.
    let (code, out, _) = spf_eval(
        &lab.dns,
        &[
            "--ip",
            "198.51.100.7",
            "--sender",
            "",
            "--helo",
            "plain.example.com",
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (code, v["result"].as_str(), v["domain"].as_str()),
        (0, Some("fail"), Some("plain.example.com"))
    );

    // Usage errors exit 2.
    for bad in [
        vec!["--ip", "not-an-ip", "--sender", "a@b.example"],
        vec!["--sender", "a@b.example"],
        vec!["--ip", "192.0.2.7"],
        vec!["--ip", "192.0.2.7", "--sender", ""],
        vec![
            "--ip",
            "192.0.2.7",
            "--sender",
            "a@b.example",
            "--timeout",
            "soon",
        ],
    ] {
        let (code, _, err) = spf_eval(&lab.dns, &bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
    }
}

#[test]
fn whole_evaluation_timeout_is_a_temperror() {
    let lab = Lab::start();
    let dir = support::tmpdir("spf-eval-timeout");
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "[access]\nallowed_ranges = [\"127.0.0.1/32\"]\ndomains = [\"example.com\"]\n\
             [dns]\nnameservers = [\"{}\"]\ntimeout = \"10s\"\nspf_timeout = \"1s\"\n",
            lab.dns.addr
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(support::bin())
        .args([
            "spf",
            "eval",
            "--ip",
            "192.0.2.7",
            "--sender",
            "a@a-slow.example.com",
            "--json",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (out.status.code(), v["result"].as_str()),
        (Some(0), Some("temperror"))
    );
    // The 10 s query bound never came into play: the 1 s evaluation bound did.
    assert!(started.elapsed() < Duration::from_secs(8));
}
