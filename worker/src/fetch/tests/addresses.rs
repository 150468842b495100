//! The address rules: names and literal forms that reach loopback, private, link-local and
//! other denied addresses are refused; public ones pass.

use super::*;

/// Item 4: names resolving to denied addresses, and denied addresses in every literal form
/// (the url crate turns decimal, octal and hex IPv4 into dotted form), are refused without
/// connecting; `fetch.allowed_networks` lets them through.
#[tokio::test]
async fn denied_addresses_are_refused_by_name_and_in_every_literal_form() {
    let (trap_addr, trap_hits) = trap().await;
    let p = trap_addr.port();
    let any_host = Fetcher::new(FetchSettings {
        allowed_hosts: vec!["*".into()],
        allowed_networks: Vec::new(),
        ..settings()
    })
    .unwrap();
    let err = any_host
        .fetch(&uri(format!("http://localhost:{p}/x.jpg")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FetchForbidden, "{err}");
    assert!(
        err.to_string()
            .contains("host \"localhost\" resolves only to denied addresses (")
            && err.to_string().contains("address 127.0.0.1 is loopback")
            && err.to_string().contains("fetch.allowed_networks"),
        "{err}"
    );
    let literals = [
        (
            format!("http://2130706433:{p}/x.jpg"),
            "127.0.0.1 is loopback",
        ),
        (
            format!("http://0177.0.0.1:{p}/x.jpg"),
            "127.0.0.1 is loopback",
        ),
        (format!("http://0x7f.1:{p}/x.jpg"), "127.0.0.1 is loopback"),
        (format!("http://127.1:{p}/x.jpg"), "127.0.0.1 is loopback"),
        (format!("http://[::1]:{p}/x.jpg"), "::1 is loopback"),
        (
            format!("http://[::ffff:127.0.0.1]:{p}/x.jpg"),
            "::ffff:127.0.0.1 is loopback (IPv4 127.0.0.1)",
        ),
        (
            format!("http://[64:ff9b::7f00:1]:{p}/x.jpg"),
            "64:ff9b::7f00:1 is loopback (IPv4 127.0.0.1)",
        ),
        (
            format!("http://0.0.0.0:{p}/x.jpg"),
            "0.0.0.0 is unspecified",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "169.254.169.254 is link-local",
        ),
        ("http://[fe80::1]/x.jpg".into(), "fe80::1 is link-local"),
        ("http://10.1.2.3/x.jpg".into(), "10.1.2.3 is private"),
        ("http://172.16.0.1/x.jpg".into(), "172.16.0.1 is private"),
        ("http://192.168.1.1/x.jpg".into(), "192.168.1.1 is private"),
        ("http://[fd00::1]/x.jpg".into(), "fd00::1 is unique local"),
        (
            "http://100.64.0.1/x.jpg".into(),
            "100.64.0.1 is shared address space",
        ),
        ("http://224.0.0.1/x.jpg".into(), "224.0.0.1 is multicast"),
        (
            "http://255.255.255.255/x.jpg".into(),
            "255.255.255.255 is broadcast",
        ),
    ];
    for (u, reason) in literals {
        let err = any_host.fetch(&uri(u.clone())).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FetchForbidden, "{u}: {err}");
        assert!(
            err.to_string().contains(&format!("address {reason}")),
            "{u}: {err}"
        );
    }
    assert_eq!(trap_hits.load(Ordering::SeqCst), 0, "the trap was reached");

    // Allowed explicitly: by name and in another literal form.
    let s = serve().await;
    let port = s.base.rsplit(':').next().unwrap().to_string();
    let loopback = Fetcher::new(FetchSettings {
        allowed_hosts: vec!["*".into()],
        allowed_networks: vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()],
        ..settings()
    })
    .unwrap();
    for u in [
        format!("http://localhost:{port}/part.jpg"),
        format!("http://2130706433:{port}/part.jpg"),
    ] {
        let got = loopback.fetch(&uri(u.clone())).await;
        assert_eq!(&got.unwrap()[..], [0xff, 0xd8, 0xff, 0xd9], "{u}");
    }
}

#[test]
fn address_rules_cover_ipv6_forms_and_leave_public_addresses_alone() {
    let policy = guard::Policy::new(&FetchSettings {
        allowed_networks: vec!["10.20.0.0/16".parse().unwrap()],
        ..FetchSettings::default()
    });
    let refused = |a: &str| policy.address_refusal(a.parse().unwrap());
    for denied in [
        "127.0.0.1",
        "0.0.0.0",
        "10.0.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "169.254.169.254",
        "100.127.0.1",
        "224.0.0.251",
        "255.255.255.255",
        "240.0.0.1",
        "::",
        "::1",
        "::ffff:10.0.0.1",
        "::ffff:0:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::1",
        "2002:7f00:1::1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1
        "fe80::1",
        "fc00::1",
        "fec0::1",
        "ff02::1",
    ] {
        assert!(refused(denied).is_some(), "{denied} is allowed");
    }
    for allowed in [
        "93.184.216.34",
        "100.128.0.1",
        "172.32.0.1",
        "2606:4700::1111",
        "::ffff:93.184.216.34",
        "64:ff9b::5db8:d822",
        // Listed in allowed_networks, in both forms.
        "10.20.1.2",
        "::ffff:10.20.1.2",
    ] {
        assert_eq!(refused(allowed), None, "{allowed}");
    }
}
