mod common;
use common::*;
use std::time::Duration;
fn run(parts: &[&[u8]]) -> String {
    let origin = Origin::start(|r| Response::ok(format!("{}", r.body_len)));
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "p"
[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ));
    let mut c = Client::connect(gw.addr);
    for p in parts {
        c.send(p);
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = c.read_response();
    format!(
        "{:?} origin={:?}",
        r.map(|r| (r.status, r.text())),
        String::from_utf8_lossy(&origin.raw())
    )
}
#[test]
fn scratch() {
    let h: &[u8] = b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    eprintln!("A {}", run(&[h, b"4\r\nWiki\r\n", b"0\r\n\r\n"]));
    eprintln!("B {}", run(&[h, b"4\r\nWiki\r\n0\r\n\r\n"]));
    eprintln!("C {}", run(&[h, b"4;e=1\r\nWiki\r\n", b"0\r\n\r\n"]));
    eprintln!("D {}", run(&[h, b"4\r\nWiki\r\n", b"0\r\nX-T: t\r\n\r\n"]));
    eprintln!(
        "E {}",
        run(&[&[h, b"4\r\nWiki\r\n0\r\nX-T: t\r\n\r\n"].concat()])
    );
    eprintln!(
        "F {}",
        run(&[h, b"E\r\nin\r\n\r\nchunks.\r\n", b"0\r\n\r\n"])
    );
}
