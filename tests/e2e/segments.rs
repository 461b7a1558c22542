//! Segment rules through the gateway: the text form, validation with
//! positions, and references to other segments.

use madtech_common::testing::Backend;
use madtech_proto::segments::v1 as pb;
use tonic::Code;

use crate::harness::Suite;

#[tokio::test]
async fn rules_are_written_as_text_validated_and_printed_back() {
    let suite = Suite::start(Backend::Sqlite).await;
    let mut marketer = suite.segments(suite.bearer(&["marketer"]));

    let checked = marketer
        .validate_rule(pb::ValidateRuleRequest {
            rule: None,
            rule_text: r#"region in ["FR","DE"] and count(event "purchase" where amount > 50, last 30d) >= 2"#.into(),
        })
        .await
        .expect("valid")
        .into_inner();
    assert_eq!(
        checked.rule_text,
        r#"region in ["DE", "FR"] and count(event "purchase" where amount > 50, last 30d) >= 2"#
    );
    assert!(checked.rule.is_some());

    let err = marketer
        .validate_rule(pb::ValidateRuleRequest {
            rule: None,
            rule_text: "has email and\n  trait.plan > \"pro\"".into(),
        })
        .await
        .expect_err("strings do not compare with >");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("rule_text") && err.message().contains("line 2, column 16"),
        "{}",
        err.message()
    );

    let vip = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "vip".into(),
            rule: None,
            rule_text: r#"trait.plan in ["pro", "enterprise"]"#.into(),
        })
        .await
        .expect("create from text")
        .into_inner()
        .segment
        .expect("segment");
    assert_eq!(vip.rule_text, r#"trait.plan in ["pro", "enterprise"]"#);

    let unknown = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "ghost".into(),
            rule: None,
            rule_text: r#"in_segment("nope")"#.into(),
        })
        .await
        .expect_err("unknown segment");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(
        unknown.message().contains("no such segment"),
        "{}",
        unknown.message()
    );

    let nested = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "vip in france".into(),
            rule: None,
            rule_text: format!(r#"in_segment("{}") and region in ["FR"]"#, vip.segment_id),
        })
        .await
        .expect("references an existing segment")
        .into_inner()
        .segment
        .expect("segment");
    let fetched = marketer
        .get_segment(pb::GetSegmentRequest {
            segment_id: nested.segment_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .segment
        .expect("segment");
    assert_eq!(fetched.rule_text, nested.rule_text);
}
