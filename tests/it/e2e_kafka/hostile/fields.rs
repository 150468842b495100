//! Request fields and record headers at their extremes: timestamps at and past the ends of
//! their range, regions past the image, very long and odd strings, fields over the limits,
//! verdicts too large to publish, odd content types and trace context, tombstones.

use clipqc::proto::v1::{inspection_request::Image, RegionOfInterest};
use pbjson_types::Timestamp;

use super::cases::{
    request, Case, Expect, Kind, Rng, DEADLINE, DECODE, FORBIDDEN, INVALID, JSON, PUBLISH,
    TOO_LARGE, UNKNOWN_PROFILE,
};

fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

/// Extreme values in every field of a request for a good `image` (250×250): timestamps at
/// and past the ends of their range, regions past the image and at u32::MAX, very long and
/// odd strings, many attributes, unknown profiles.
pub fn extreme(image: &Image, out: &mut Vec<Case>) {
    let k = Kind::Extreme;
    let mut n = 0;
    let mut id = |what: &str| {
        n += 1;
        format!("ex-{n}-{what}")
    };
    let base = |id: String| request(id, image.clone());
    for (s, nanos) in [
        (i64::MAX, 0),
        (i64::MIN, 0),
        (253_402_300_800, 0),
        (-62_135_596_801, 0),
        (0, -1),
        (0, 1_000_000_000),
        (0, i32::MAX),
        (i64::MAX, i32::MIN),
    ] {
        for deadline in [false, true] {
            let mut r = base(id("time"));
            if deadline {
                r.deadline = ts(s, nanos);
            } else {
                r.captured_at = ts(s, nanos);
            }
            let what = format!("deadline={deadline} seconds={s} nanos={nanos}");
            out.push(Case::proto(k, what, &r, Expect::error(&[INVALID])));
        }
    }
    // The ends of the valid range are valid times.
    let mut r = base(id("edges"));
    r.captured_at = ts(-62_135_596_800, 0);
    r.deadline = ts(253_402_300_799, 999_999_999);
    out.push(Case::proto(
        k,
        "year 1 capture, 9999 deadline",
        &r,
        Expect::PASS,
    ));
    out.push(Case::json(
        k,
        "year 1 capture, 9999 deadline",
        &r,
        Expect::PASS,
    ));
    for seconds in [1, 946_684_800] {
        let mut r = base(id("late"));
        r.deadline = ts(seconds, 0);
        out.push(Case::proto(
            k,
            "deadline passed",
            &r,
            Expect::error(&[DEADLINE]),
        ));
    }
    for text in [
        "10000-01-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "2026-13-45T99:99:99Z",
        "-292277022657-01-27T08:29:52Z",
        "1970-01-01T00:00:00.99999999999Z",
        "2026-11-30T00:00:00+99:00",
        "9999-12-31T23:59:59-23:59",
    ] {
        for field in ["capturedAt", "deadline"] {
            let v = serde_json::json!({"requestId": id("jtime"), "uri": "x", field: text});
            let what = format!("{field} {text}");
            let e = Expect::error(&[INVALID, DEADLINE, FORBIDDEN]);
            out.push(Case::raw(
                k,
                what,
                v.to_string().into_bytes(),
                Some(JSON),
                e,
            ));
        }
    }
    let m = u32::MAX;
    for (x, y, w, h, pass) in [
        (m, m, m, m, false),
        (m - 1, 0, 2, 2, false),
        (0, m - 1, 2, 2, false),
        (0, 0, m, m, false),
        (100, 100, m, 1, false),
        (0, 0, 1, 1, true),
        (249, 249, 1, 1, true),
        (250, 250, 1, 1, false),
        (0, 0, 250, 250, true),
        (0, 0, 251, 250, false),
        (1, 1, 249, 249, true),
    ] {
        let mut r = base(id("region"));
        r.region = Some(RegionOfInterest {
            x,
            y,
            width: w,
            height: h,
        });
        let what = format!("region {x},{y} {w}x{h}");
        let e = if pass {
            Expect::PASS
        } else {
            Expect::error(&[DECODE, TOO_LARGE, INVALID])
        };
        out.push(Case::proto(k, what.clone(), &r, e));
        out.push(Case::json(k, what, &r, e));
    }
    for region in [
        r#"{"width":-1,"height":5}"#,
        r#"{"x":4294967296,"width":1,"height":1}"#,
        r#"{"x":1e40,"width":1,"height":1}"#,
        r#"{"x":"7","width":"1","height":"1"}"#,
        r#"{"width":1.5,"height":1}"#,
    ] {
        let text = format!(
            r#"{{"requestId":"{}","uri":"x","region":{region}}}"#,
            id("jr")
        );
        let e = Expect::error(&[INVALID, FORBIDDEN]);
        out.push(Case::raw(
            k,
            format!("region {region}"),
            text.into_bytes(),
            Some(JSON),
            e,
        ));
    }
    strings(image, &mut id, out);
}

fn strings(image: &Image, id: &mut impl FnMut(&str) -> String, out: &mut Vec<Case>) {
    let k = Kind::Extreme;
    let base = |id: String| request(id, image.clone());
    let long = "x".repeat(300_000);
    let mut r = base(format!("{}-{}", id("long-id"), &long[..200_000]));
    out.push(Case::proto(
        k,
        "200 kB request id",
        &r,
        Expect::error(&[INVALID]),
    ));
    r = base(id("long-camera"));
    r.camera_id = long.clone();
    out.push(Case::proto(
        k,
        "300 kB camera id",
        &r,
        Expect::error(&[INVALID]),
    ));
    r = base(id("long-line"));
    r.line_id = long[..100_000].to_string();
    out.push(Case::proto(
        k,
        "100 kB line id",
        &r,
        Expect::error(&[INVALID]),
    ));
    for odd in [
        "nul\0inside",
        "\u{202e}rtl\u{200b}zero-width",
        "emoji 🔥🧨",
        "new\nline\r\ttab",
        "\"quoted\" \\ back",
    ] {
        let mut r = base(format!("{}-{odd}", id("odd")));
        r.camera_id = odd.into();
        r.line_id = odd.into();
        r.attributes.insert(odd.into(), odd.into());
        out.push(Case::proto(
            k,
            format!("odd text {odd:?}"),
            &r,
            Expect::PASS,
        ));
        out.push(Case::json(k, format!("odd text {odd:?}"), &r, Expect::PASS));
    }
    for blank in ["", " ", "\t\n"] {
        let r = base(blank.into());
        out.push(Case::proto(
            k,
            format!("blank id {blank:?}"),
            &r,
            Expect::error(&[INVALID]),
        ));
    }
    for profile in ["does-not-exist", "../default", "DEFAULT", &long[..50_000]] {
        let mut r = base(id("profile"));
        r.profile = profile.into();
        let what = format!("profile {:?}", &profile[..profile.len().min(20)]);
        // Ids over 256 bytes are refused before they are looked up.
        let expect = if profile.len() > 256 {
            Expect::error(&[INVALID])
        } else {
            Expect::error(&[UNKNOWN_PROFILE])
        };
        out.push(Case::proto(k, what, &r, expect));
    }
    for i in 0..10 {
        // A new line id per request: metric labels and rate windows must stay bounded.
        let mut r = base(id("cardinality"));
        r.line_id = format!("line-{i}-{}", "z".repeat(200));
        out.push(Case::proto(k, "unique line id", &r, Expect::PASS));
    }
}

/// Fields past the limits: inline images over `max_bytes`, attribute maps of tens of
/// thousands of entries, attributes that make the verdict too large to publish.
pub fn oversize(rng: &mut Rng, image: &Image, max_bytes: usize, out: &mut Vec<Case>) {
    let k = Kind::Oversize;
    for (i, extra) in [1, 10, 1_000, 50_000, 100_000, 200_000].iter().enumerate() {
        let r = request(
            format!("ov-inline-{i}"),
            Image::InlineData(rng.bytes(max_bytes + extra)),
        );
        let what = format!("inline {} bytes", max_bytes + extra);
        out.push(Case::proto(
            k,
            what.clone(),
            &r,
            Expect::error(&[TOO_LARGE]),
        ));
        if i < 3 {
            out.push(Case::json(k, what, &r, Expect::error(&[TOO_LARGE])));
        }
    }
    for (i, entries) in [10_000, 30_000].iter().enumerate() {
        let mut r = request(format!("ov-attrs-{i}"), image.clone());
        r.attributes = (0..*entries)
            .map(|j| (format!("k{j}"), "v".into()))
            .collect();
        out.push(Case::proto(
            k,
            format!("{entries} attributes"),
            &r,
            Expect::pass_or(&[PUBLISH]),
        ));
    }
    for i in 0..3 {
        // Control characters take six bytes each in the JSON verdict: 200 kB of them make a
        // verdict of 1.2 MB, past what the producer accepts.
        let mut r = request(format!("ov-escape-{i}"), image.clone());
        r.attributes.insert("raw".into(), "\u{1}".repeat(200_000));
        out.push(Case::proto(
            k,
            "verdict over 1 MB",
            &r,
            Expect::error(&[PUBLISH]),
        ));
    }
}

/// Headers: unknown and undecodable content types, malformed and huge trace context, many
/// headers, a tombstone, a huge key.
pub fn headers(image: &Image, out: &mut Vec<Case>) {
    let k = Kind::Headers;
    let r = |i: &str| request(format!("hd-{i}"), image.clone());
    let mut add = |mut c: Case, extra: Vec<(&str, Vec<u8>)>| {
        c.headers
            .extend(extra.into_iter().map(|(h, v)| (h.to_string(), v)));
        out.push(c);
    };
    let proto = |i: &str, e| Case::proto(k, i.to_string(), &r(i), e);
    // Payloads of an unknown type are not decoded: their verdicts cannot name the request.
    let mut c = proto("text-plain", Expect::error(&[INVALID]));
    c.headers[0].1 = b"text/plain".to_vec();
    c.request_id = None;
    add(c, vec![]);
    let mut c = Case::json(
        k,
        "json as invalid utf-8 type",
        &r("bad-type"),
        Expect::error(&[INVALID]),
    );
    c.headers[0].1 = vec![0xff, 0xfe, b'j'];
    c.request_id = None;
    add(c, vec![]);
    let mut c = proto("proto-bad-type", Expect::PASS);
    c.headers[0].1 = vec![0xc3, 0x28];
    add(c, vec![]);
    let mut c = Case::json(k, "json with parameters", &r("json-params"), Expect::PASS);
    c.headers[0].1 = b"Application/JSON ; charset=utf-16; x=\"y\"".to_vec();
    add(c, vec![]);
    let huge = "a".repeat(100_000).into_bytes();
    for (i, tp) in [
        b"00-zzzz".to_vec(),
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec(),
        b"00-00000000000000000000000000000000-0000000000000000-01".to_vec(),
        vec![0xff; 55],
        huge.clone(),
    ]
    .into_iter()
    .enumerate()
    {
        add(
            proto(&format!("traceparent-{i}"), Expect::PASS),
            vec![("traceparent", tp)],
        );
    }
    let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec();
    add(
        proto("tracestate-huge", Expect::PASS),
        vec![("traceparent", tp.clone()), ("tracestate", huge.clone())],
    );
    let many: Vec<(&str, Vec<u8>)> = (0..500).map(|_| ("x-many", b"v".to_vec())).collect();
    add(proto("500-headers", Expect::PASS), many);
    add(
        proto("content-type-twice", Expect::PASS),
        vec![("Content-Type", b"application/json".to_vec())],
    );
    let mut c = proto("tombstone", Expect::error(&[INVALID]));
    c.payload = None;
    c.request_id = None;
    add(c, vec![]);
    let mut c = proto("huge-key", Expect::PASS);
    c.key = Some(huge);
    add(c, vec![]);
    let mut c = proto("empty-header", Expect::PASS);
    c.headers.push(("x-empty".into(), Vec::new()));
    add(c, vec![]);
    // Bad payloads whose key, or headers, alone are over the worker producer's
    // message.max.bytes (1,000,000) and under the broker's (1,048,588): their dead letters are
    // too large even without the payload, and once crash-looped the group. They go trimmed.
    let not_a_request = b"\x01not a request".to_vec();
    let mut c = Case::raw(
        k,
        "1 MB key",
        not_a_request.clone(),
        None,
        Expect::error(&[INVALID]),
    );
    c.key = Some(vec![b'k'; 1_000_100]);
    add(c, vec![]);
    let bulky: Vec<(&str, Vec<u8>)> = (0..16).map(|_| ("x-bulk", vec![b'h'; 62_600])).collect();
    let c = Case::raw(k, "1 MB of headers", not_a_request, None, Expect::error(&[INVALID]));
    add(c, bulky);
}
