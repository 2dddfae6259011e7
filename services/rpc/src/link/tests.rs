use super::*;
use tokio::net::TcpListener;

#[test]
fn specs_parse_and_print() {
    let spec: LinkSpec = "rtt:100ms, jitter:5ms,rate:100mbit,loss:0.1%"
        .parse()
        .unwrap();
    assert_eq!(spec.rtt, Duration::from_millis(100));
    assert_eq!(spec.jitter, Duration::from_millis(5));
    assert_eq!(spec.rate_bps, 100_000_000);
    assert_eq!(spec.loss_percent, 0.1);
    assert!(!spec.down);
    assert_eq!(
        spec.to_string(),
        "rtt:100ms,jitter:5ms,rate:100mbit,loss:0.1%"
    );
    assert_eq!(spec.to_string().parse::<LinkSpec>().unwrap(), spec);

    let spec: LinkSpec = "rate:1.5gbit,down".parse().unwrap();
    assert_eq!(spec.rate_bps, 1_500_000_000);
    assert!(spec.down);
    assert_eq!(spec.to_string(), "rate:1500mbit,down");
    assert_eq!(
        "rate:500kbit".parse::<LinkSpec>().unwrap().rate_bps,
        500_000
    );
    assert_eq!(
        "rtt:1.5s".parse::<LinkSpec>().unwrap().rtt,
        Duration::from_millis(1500)
    );
    assert!("down,up".parse::<LinkSpec>().unwrap().is_none());
    assert_eq!(LinkSpec::default().to_string(), "none");
    assert!("none".parse::<LinkSpec>().unwrap().is_none());
}

#[test]
fn bad_specs_name_the_bad_part() {
    for (text, part) in [
        ("rtt:100ms,rate:10MB", "`rate:10MB`"),
        ("rtt:fast", "`rtt:fast`"),
        ("loss:0.1", "`loss:0.1`"),
        ("loss:120%", "`loss:120%`"),
        ("rate:0mbit", "`rate:0mbit`"),
        ("rtt:100ms,bandwidth:1mbit", "`bandwidth:1mbit`"),
        ("jitter:2m", "`jitter:2m`"),
    ] {
        let e = text.parse::<LinkSpec>().unwrap_err();
        assert!(e.to_string().starts_with(part), "{text}: {e}");
    }
}

#[test]
fn entries_and_files() {
    let e: LinkEntry = "ap-guangzhou,ap-singapore=rtt:180ms".parse().unwrap();
    assert_eq!(
        (e.a.as_str(), e.b.as_str()),
        ("ap-guangzhou", "ap-singapore")
    );
    assert_eq!(
        e.change,
        LinkChange::Set(LinkSpec {
            rtt: Duration::from_millis(180),
            ..Default::default()
        })
    );
    assert_eq!(e.to_string(), "ap-guangzhou,ap-singapore=rtt:180ms");
    assert_eq!(
        "a1,b1=down".parse::<LinkEntry>().unwrap().change,
        LinkChange::Down
    );
    assert_eq!(
        "a1,b1=up".parse::<LinkEntry>().unwrap().change,
        LinkChange::Up
    );
    assert_eq!(
        "a1,b1=none".parse::<LinkEntry>().unwrap().change,
        LinkChange::Clear
    );
    for bad in [
        "a1=rtt:1ms",
        "a1,a1=rtt:1ms",
        "A,b1=up",
        "a1,b1",
        "a1,b1=rtt",
    ] {
        assert!(bad.parse::<LinkEntry>().is_err(), "{bad}");
    }
    let entries = parse_links_file(
        "# regions\nap-guangzhou,ap-shanghai=rtt:30ms # mainland\n\n  ap-shanghai,eu-frankfurt=rtt:200ms,rate:1gbit\n",
    )
    .unwrap();
    assert_eq!(entries.len(), 2);
    let e = parse_links_file("a1,b1=rtt:1ms\na1,b1=rtt:x\n").unwrap_err();
    assert!(e.to_string().starts_with("line 2: `rtt:x`"), "{e}");
}

#[test]
fn the_table_applies_both_directions_and_realistic_defaults() {
    let links = Links::new();
    assert_eq!(links.get("ap-guangzhou", "ap-shanghai"), None);
    links.apply(
        &"ap-guangzhou,ap-shanghai=rtt:50ms,rate:10mbit"
            .parse()
            .unwrap(),
    );
    let spec = links.get("ap-shanghai", "ap-guangzhou").unwrap();
    assert_eq!(spec.rtt, Duration::from_millis(50));
    links.apply(&"ap-guangzhou,ap-shanghai=down".parse().unwrap());
    let spec = links.get("ap-guangzhou", "ap-shanghai").unwrap();
    assert!(spec.down);
    assert_eq!(spec.rate_bps, 10_000_000, "down keeps the other settings");
    links.apply(&"ap-guangzhou,ap-shanghai=up".parse().unwrap());
    assert!(!links.get("ap-guangzhou", "ap-shanghai").unwrap().down);
    links.apply(&"ap-guangzhou,ap-shanghai=none".parse().unwrap());
    assert_eq!(links.get("ap-guangzhou", "ap-shanghai"), None);

    links.set_realistic(true);
    let rtt = |a, b| links.get(a, b).unwrap().rtt.as_millis();
    assert_eq!(rtt("ap-guangzhou", "ap-beijing"), 30);
    assert_eq!(rtt("ap-guangzhou", "ap-singapore"), 180);
    assert_eq!(rtt("na-siliconvalley", "ap-shenzhen-fsi"), 180);
    assert_eq!(rtt("ap-singapore", "eu-frankfurt"), 80);
    links.apply(&"ap-guangzhou,ap-beijing=rtt:5ms".parse().unwrap());
    assert_eq!(rtt("ap-beijing", "ap-guangzhou"), 5);
    let out = links.outgoing(
        "ap-guangzhou",
        &[
            "ap-beijing".into(),
            "ap-singapore".into(),
            "ap-guangzhou".into(),
        ],
    );
    let out: Vec<(String, u128)> = out
        .into_iter()
        .map(|(to, s)| (to, s.rtt.as_millis()))
        .collect();
    assert_eq!(
        out,
        vec![("ap-beijing".into(), 5), ("ap-singapore".into(), 180)]
    );
}

/// An echo server on loopback; returns its address.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn round_trips_take_the_rtt() {
    let addr = echo_server().await;
    let links = Links::new();
    let mut plain = LinkStream::connect(&links, "a1", "b1", addr).await.unwrap();
    let started = Instant::now();
    plain.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    plain.read_exact(&mut got).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));

    links.apply(&"a1,b1=rtt:200ms".parse().unwrap());
    let started = Instant::now();
    let mut linked = LinkStream::connect(&links, "a1", "b1", addr).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "the handshake takes a round trip"
    );
    for stream in [&mut linked, &mut plain] {
        for _ in 0..3 {
            let started = Instant::now();
            stream.write_all(b"ping").await.unwrap();
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(200), "{took:?}");
            assert!(took < Duration::from_millis(800), "{took:?}");
        }
    }
}

#[tokio::test]
async fn a_rate_bounds_throughput() {
    // A sink that answers one byte once it has read 1 MiB.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < (1 << 20) {
            total += socket.read(&mut buf).await.unwrap();
        }
        socket.write_all(b"k").await.unwrap();
    });
    let links = Links::new();
    links.apply(&"a1,b1=rate:2mbit".parse().unwrap());
    let mut stream = LinkStream::connect(&links, "a1", "b1", addr).await.unwrap();
    let started = Instant::now();
    let data = vec![7u8; 1 << 20];
    stream.write_all(&data).await.unwrap();
    let mut ok = [0u8; 1];
    stream.read_exact(&mut ok).await.unwrap();
    let took = started.elapsed().as_secs_f64();
    // 8 Mibit at 2 Mbit/s: 4.19 s, less a burst of 1/20 s.
    assert!((3.9..8.0).contains(&took), "{took}s");
}

#[tokio::test]
async fn down_refuses_connections_and_resets_open_ones() {
    let addr = echo_server().await;
    let links = Links::new();
    // One connection shaped from the start, one made before any link (the fast path).
    links.apply(&"a1,b1=rtt:10ms".parse().unwrap());
    let mut shaped = LinkStream::connect(&links, "a1", "b1", addr).await.unwrap();
    links.apply(&"a1,b1=none".parse().unwrap());
    let mut direct = LinkStream::connect(&links, "a1", "b1", addr).await.unwrap();
    assert!(matches!(direct.mode, Mode::Direct { .. }));
    let mut got = [0u8; 2];
    for stream in [&mut shaped, &mut direct] {
        stream.write_all(b"hi").await.unwrap();
        stream.read_exact(&mut got).await.unwrap();
    }
    // Reads waiting when the link goes down fail with a reset.
    let reads: Vec<_> = [shaped, direct]
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut one = [0u8; 1];
                (s.read(&mut one).await, s)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    links.apply(&"a1,b1=down".parse().unwrap());
    let started = Instant::now();
    let e = LinkStream::connect(&links, "b1", "a1", addr)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    assert!(started.elapsed() < Duration::from_millis(50));
    for read in reads {
        let (result, mut stream) = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .expect("the read ends")
            .unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        // A reset connection stays broken, even after the link comes back.
        links.apply(&"a1,b1=up".parse().unwrap());
        assert_eq!(
            stream.write_all(b"x").await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        links.apply(&"a1,b1=down".parse().unwrap());
    }
    links.apply(&"a1,b1=up".parse().unwrap());
    let mut again = LinkStream::connect(&links, "a1", "b1", addr).await.unwrap();
    again.write_all(b"ok").await.unwrap();
    again.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ok");
}

#[tokio::test]
async fn the_connector_serves_tonic() {
    let addr = echo_server().await;
    let mut connector = LinkConnector::new(Links::new(), "a1", "b1");
    let uri: http::Uri = format!("http://{addr}").parse().unwrap();
    let io = tower::Service::call(&mut connector, uri).await.unwrap();
    let mut stream = io.into_inner();
    stream.write_all(b"yo").await.unwrap();
    let mut got = [0u8; 2];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"yo");
}
