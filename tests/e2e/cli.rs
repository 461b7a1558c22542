//! The `madtech` binary as an operator runs it.

use std::process::Command;

fn madtech(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_madtech"))
        .args(args)
        .output()
        .expect("madtech runs")
}

#[test]
fn signal_decode_prints_json_and_fails_loudly_on_malformed_strings() {
    // IAB US Privacy string spec example (shared/testdata/signals.json U2).
    let out = madtech(&["signal", "decode", "1NYN"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["kind"], "usp");
    assert_eq!(json["opt_out_sale"], "Y");

    // GPP spec example 2: a TCF section and a US Privacy section.
    let gpp = "DBACNY~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA~1YNN";
    let out = madtech(&["signal", "decode", gpp]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["section_ids"], serde_json::json!([2, 6]));
    assert_eq!(json["tcfeuv2"]["cmp_id"], 31);
    assert_eq!(json["uspv1"]["notice"], "Y");

    // iabtcf-java's TCStringV2Test string predates TCF 2.2: decoded, with
    // the problems listed.
    let out = madtech(&[
        "signal",
        "decode",
        "--kind",
        "tcf",
        "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["cmp_id"], 675);
    assert!(!json["problems"].as_array().expect("problems").is_empty());

    for (args, reason) in [
        (vec!["signal", "decode", "2YNN"], "version"),
        (vec!["signal", "decode", "COtybn4PA_zT4KjACBEN"], ""),
        (vec!["signal", "decode", "--kind", "xyz", "1YNN"], "xyz"),
    ] {
        let out = madtech(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(reason) && !stderr.trim().is_empty(),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "nothing on stdout for {args:?}");
    }
}
