//! Allocation-free helpers for writing HTTP/1.1 heads: status lines, request
//! lines, header fields, decimal numbers, the cached `Date` value, and the
//! hop-by-hop header classification.

use std::time::{SystemTime, UNIX_EPOCH};

macro_rules! statuses {
    ($($code:literal => $reason:literal,)*) => {
        /// Standard reason phrase for `status`, `"Unknown"` otherwise.
        pub fn reason(status: u16) -> &'static str {
            match status {
                $($code => $reason,)*
                _ => "Unknown",
            }
        }

        /// Precomputed `HTTP/1.1 <code> <reason>\r\n` for known codes.
        fn status_line(status: u16) -> Option<&'static [u8]> {
            match status {
                $($code => Some(concat!("HTTP/1.1 ", $code, " ", $reason, "\r\n").as_bytes()),)*
                _ => None,
            }
        }
    };
}

statuses! {
    100 => "Continue",
    101 => "Switching Protocols",
    102 => "Processing",
    103 => "Early Hints",
    200 => "OK",
    201 => "Created",
    202 => "Accepted",
    203 => "Non-Authoritative Information",
    204 => "No Content",
    205 => "Reset Content",
    206 => "Partial Content",
    207 => "Multi-Status",
    208 => "Already Reported",
    226 => "IM Used",
    300 => "Multiple Choices",
    301 => "Moved Permanently",
    302 => "Found",
    303 => "See Other",
    304 => "Not Modified",
    305 => "Use Proxy",
    307 => "Temporary Redirect",
    308 => "Permanent Redirect",
    400 => "Bad Request",
    401 => "Unauthorized",
    402 => "Payment Required",
    403 => "Forbidden",
    404 => "Not Found",
    405 => "Method Not Allowed",
    406 => "Not Acceptable",
    407 => "Proxy Authentication Required",
    408 => "Request Timeout",
    409 => "Conflict",
    410 => "Gone",
    411 => "Length Required",
    412 => "Precondition Failed",
    413 => "Content Too Large",
    414 => "URI Too Long",
    415 => "Unsupported Media Type",
    416 => "Range Not Satisfiable",
    417 => "Expectation Failed",
    418 => "I'm a teapot",
    421 => "Misdirected Request",
    422 => "Unprocessable Content",
    423 => "Locked",
    424 => "Failed Dependency",
    425 => "Too Early",
    426 => "Upgrade Required",
    428 => "Precondition Required",
    429 => "Too Many Requests",
    431 => "Request Header Fields Too Large",
    451 => "Unavailable For Legal Reasons",
    500 => "Internal Server Error",
    501 => "Not Implemented",
    502 => "Bad Gateway",
    503 => "Service Unavailable",
    504 => "Gateway Timeout",
    505 => "HTTP Version Not Supported",
    506 => "Variant Also Negotiates",
    507 => "Insufficient Storage",
    508 => "Loop Detected",
    510 => "Not Extended",
    511 => "Network Authentication Required",
}

/// Appends `HTTP/1.1 <status> <reason>\r\n` (precomputed for known codes).
pub fn push_status_line(out: &mut Vec<u8>, status: u16) {
    match status_line(status) {
        Some(line) => out.extend_from_slice(line),
        None => {
            out.extend_from_slice(b"HTTP/1.1 ");
            push_u64(out, u64::from(status));
            out.extend_from_slice(b" Unknown\r\n");
        }
    }
}

/// Appends `<method> <target> HTTP/1.1\r\n`.
pub fn push_request_line(out: &mut Vec<u8>, method: &[u8], target: &[u8]) {
    out.reserve(method.len() + target.len() + 11);
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Appends `<name>: <value>\r\n`. The caller guarantees both are valid
/// (e.g. taken from a parsed head).
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `data` as one chunk of a chunked body (`SIZE-in-hex CRLF data CRLF`); empty
/// `data` is the last chunk (`0 CRLF CRLF`, no trailers).
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut tmp = [0u8; 16];
    let mut i = tmp.len();
    let mut n = data.len();
    loop {
        i -= 1;
        tmp[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.reserve(16 + 4 + data.len());
    out.extend_from_slice(&tmp[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the decimal form of `n`.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Appends the text form of `ip` (dotted quad for IPv4, RFC 5952 for IPv6). IPv4, the common
/// case, is written digit by digit: `Display` costs about twenty times more.
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut tmp = [0u8; 15];
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    tmp[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    tmp[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    tmp[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                tmp[n] = b'0' + o % 10;
                n += 1;
            }
            out.extend_from_slice(&tmp[..n]);
        }
        std::net::IpAddr::V6(v6) => {
            let _ = std::io::Write::write_fmt(out, format_args!("{v6}"));
        }
    }
}

/// Whether `name` is a hop-by-hop header (case-insensitive): connection,
/// keep-alive, proxy-connection, te, trailer, transfer-encoding, upgrade,
/// proxy-authenticate, proxy-authorization.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    super::HeaderKind::of(name).is_hop_by_hop()
}

/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub const IMF_FIXDATE_LEN: usize = 29;

/// Caches the `Date` header value, reformatting it only when the second
/// changes. Keep one per worker thread.
#[derive(Clone, Debug)]
pub struct DateCache {
    secs: u64,
    buf: [u8; IMF_FIXDATE_LEN],
    rfc3339: [u8; RFC3339_LEN],
}

impl Default for DateCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DateCache {
    /// Creates the cache, formatted for the current time.
    pub fn new() -> Self {
        let secs = now_secs();
        DateCache {
            secs,
            buf: format_imf_fixdate(secs),
            rfc3339: format_rfc3339(secs),
        }
    }

    /// Current time as an IMF-fixdate, e.g. `Wed, 25 Nov 2026 13:20:03 GMT`.
    pub fn get(&mut self) -> &[u8] {
        let secs = now_secs();
        if secs != self.secs {
            self.refresh(secs);
        }
        &self.buf
    }

    /// Current time as RFC 3339 UTC, e.g. `2026-11-25T13:20:03Z` (for logs).
    pub fn get_rfc3339(&mut self) -> &[u8] {
        let secs = now_secs();
        if secs != self.secs {
            self.refresh(secs);
        }
        &self.rfc3339
    }

    fn refresh(&mut self, secs: u64) {
        self.secs = secs;
        self.buf = format_imf_fixdate(secs);
        self.rfc3339 = format_rfc3339(secs);
    }
}

/// Length of [`format_rfc3339`]'s output.
pub const RFC3339_LEN: usize = 20;

/// Formats Unix time `secs` as RFC 3339 UTC with second precision (years past 9999 clamped).
pub fn format_rfc3339(secs: u64) -> [u8; RFC3339_LEN] {
    let secs = secs.min(253_402_300_799);
    let sod = secs % 86_400;
    let (y, m, d) = civil_from_days(secs / 86_400);
    let mut out = *b"1970-01-01T00:00:00Z";
    two(&mut out[0..2], y / 100);
    two(&mut out[2..4], y % 100);
    two(&mut out[5..7], m);
    two(&mut out[8..10], d);
    two(&mut out[11..13], (sod / 3600) as u32);
    two(&mut out[14..16], (sod / 60 % 60) as u32);
    two(&mut out[17..19], (sod % 60) as u32);
    out
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Formats Unix time `secs` as an IMF-fixdate (years past 9999 are clamped).
pub fn format_imf_fixdate(secs: u64) -> [u8; IMF_FIXDATE_LEN] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    // 9999-12-31T23:59:59Z
    let secs = secs.min(253_402_300_799);
    let days = secs / 86_400;
    let sod = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[0..3].copy_from_slice(DAYS[(days % 7) as usize]);
    two(&mut out[5..7], d);
    out[8..11].copy_from_slice(MONTHS[(m - 1) as usize]);
    two(&mut out[12..14], y / 100);
    two(&mut out[14..16], y % 100);
    two(&mut out[17..19], (sod / 3600) as u32);
    two(&mut out[20..22], (sod / 60 % 60) as u32);
    two(&mut out[23..25], (sod % 60) as u32);
    out
}

fn two(dst: &mut [u8], v: u32) {
    dst[0] = b'0' + (v / 10) as u8;
    dst[1] = b'0' + (v % 10) as u8;
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic
/// Gregorian (H. Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = (yoe + era * 400) as u32 + u32::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {

    #[test]
    fn chunks() {
        let mut o = Vec::new();
        push_chunk(&mut o, b"hello world");
        push_chunk(&mut o, &[b'x'; 300]);
        push_chunk(&mut o, b"");
        let mut want = b"b\r\nhello world\r\n12c\r\n".to_vec();
        want.extend_from_slice(&[b'x'; 300]);
        want.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(o, want);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(&super::format_rfc3339(0), b"1970-01-01T00:00:00Z");
        // 2026-11-25T13:20:03Z
        assert_eq!(
            &super::format_rfc3339(1_795_612_803),
            b"2026-11-25T13:20:03Z"
        );
        // 2000-02-29T23:59:59Z (leap day)
        assert_eq!(&super::format_rfc3339(951_868_799), b"2000-02-29T23:59:59Z");
    }

    use super::*;

    #[test]
    fn status_lines() {
        let mut v = Vec::new();
        push_status_line(&mut v, 200);
        push_status_line(&mut v, 404);
        push_status_line(&mut v, 599);
        push_status_line(&mut v, 1000);
        assert_eq!(
            v,
            b"HTTP/1.1 200 OK\r\nHTTP/1.1 404 Not Found\r\nHTTP/1.1 599 Unknown\r\nHTTP/1.1 1000 Unknown\r\n"
        );
        assert_eq!(reason(502), "Bad Gateway");
        assert_eq!(reason(299), "Unknown");
        for s in 100..600 {
            let mut v = Vec::new();
            push_status_line(&mut v, s);
            assert_eq!(v, format!("HTTP/1.1 {s} {}\r\n", reason(s)).into_bytes());
        }
    }

    #[test]
    fn request_line_and_header() {
        let mut v = Vec::new();
        push_request_line(&mut v, b"GET", b"/a?b");
        push_header(&mut v, b"Host", b"x");
        assert_eq!(v, b"GET /a?b HTTP/1.1\r\nHost: x\r\n");
    }

    #[test]
    fn u64_digits() {
        for n in [0, 1, 9, 10, 99, 100, 12345, u64::MAX / 10, u64::MAX] {
            let mut v = b"x".to_vec();
            push_u64(&mut v, n);
            assert_eq!(v, format!("x{n}").into_bytes());
        }
    }

    #[test]
    fn hop_by_hop() {
        for n in [
            "connection",
            "Keep-Alive",
            "PROXY-CONNECTION",
            "te",
            "TE",
            "Trailer",
            "transfer-encoding",
            "Upgrade",
            "proxy-authenticate",
            "Proxy-Authorization",
        ] {
            assert!(is_hop_by_hop(n.as_bytes()), "{n}");
        }
        for n in [
            "",
            "t",
            "tx",
            "host",
            "trailers",
            "upgradeX",
            "content-length",
            "keep-alivf",
        ] {
            assert!(!is_hop_by_hop(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn imf_fixdate() {
        let f = |s| String::from_utf8(format_imf_fixdate(s).to_vec()).unwrap();
        assert_eq!(f(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(f(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(f(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(f(1_795_612_803), "Wed, 25 Nov 2026 13:20:03 GMT");
        assert_eq!(f(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 GMT");
        assert_eq!(f(4_107_542_400), "Mon, 01 Mar 2100 00:00:00 GMT");
        assert_eq!(f(u64::MAX), "Fri, 31 Dec 9999 23:59:59 GMT");
        let mut c = DateCache::new();
        let now = c.get().to_vec();
        assert_eq!(now.len(), IMF_FIXDATE_LEN);
        assert!(now.ends_with(b" GMT"));
        assert!(now[12..14] >= b"20"[..]);
    }

    #[test]
    fn ip_text_matches_display() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let mut ips: Vec<IpAddr> = [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [255, 255, 255, 255],
            [10, 9, 100, 99],
            [1, 20, 200, 0],
        ]
        .into_iter()
        .map(|o| IpAddr::V4(Ipv4Addr::from(o)))
        .collect();
        ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        ips.push("2001:db8::ff00:42:8329".parse().unwrap());
        ips.push("::ffff:192.0.2.1".parse().unwrap());
        for o in 0..=255u8 {
            ips.push(IpAddr::V4(Ipv4Addr::new(
                o,
                255 - o,
                o / 3,
                o.wrapping_mul(7),
            )));
        }
        for ip in ips {
            let mut out = b"x".to_vec();
            push_ip(&mut out, ip);
            assert_eq!(&out[1..], ip.to_string().as_bytes(), "{ip}");
        }
    }
}
