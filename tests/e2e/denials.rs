//! Every way in that must be refused, refused at the gateway with the right
//! status, and nothing changed behind it.

use madtech_common::testing::Backend;
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::gateway::v1 as gateway_pb;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as segments_pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::Suite;

fn email(value: &str) -> profiles_pb::Identifier {
    profiles_pb::Identifier {
        kind: "email".into(),
        value: value.into(),
    }
}

fn upsert_request(value: &str) -> profiles_pb::UpsertProfileRequest {
    profiles_pb::UpsertProfileRequest {
        identifiers: vec![email(value)],
        traits: Default::default(),
        region: "FR".into(),
        ..Default::default()
    }
}

fn get_by_email(value: &str) -> profiles_pb::GetProfileRequest {
    profiles_pb::GetProfileRequest {
        lookup: Some(profiles_pb::get_profile_request::Lookup::Identifier(email(
            value,
        ))),
    }
}

#[tokio::test]
async fn callers_without_a_valid_token_are_unauthenticated_and_change_nothing() {
    let suite = Suite::start(Backend::Sqlite).await;
    let other_key_token = {
        let other = Suite::start(Backend::Sqlite).await;
        other.token(&["admin"])
    };
    let attempts = [
        Suite::anonymous(),
        Suite::raw_bearer("Bearer not-a-token"),
        Suite::raw_bearer("Basic YWRtaW46YWRtaW4="),
        Suite::raw_bearer(&format!("Bearer {other_key_token}")),
        // A token with its signature cut off.
        Suite::raw_bearer(&format!(
            "Bearer {}",
            suite
                .token(&["admin"])
                .rsplit_once('.')
                .map(|(head, _)| format!("{head}."))
                .unwrap_or_default()
        )),
    ];
    for bearer in attempts {
        let status = suite
            .profiles(bearer)
            .upsert_profile(upsert_request("intruder@example.com"))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            !status.message().contains("eyJ"),
            "the answer never echoes a token"
        );
    }
    let status = suite
        .profiles(suite.bearer(&["admin"]))
        .get_profile(get_by_email("intruder@example.com"))
        .await
        .expect_err("nothing was written");
    assert_eq!(status.code(), Code::NotFound);
    suite.stop().await;
}

#[tokio::test]
async fn roles_reach_only_what_the_rbac_policy_allows() {
    let suite = Suite::start(Backend::Sqlite).await;
    // The adtech service may not read martech data.
    let status = suite
        .profiles(suite.bearer(&["activation"]))
        .get_profile(get_by_email("a@example.com"))
        .await
        .expect_err("denied");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("rbac_policy.csv"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("ProfileService/GetProfile"));

    let status = suite
        .consent(suite.bearer(&["activation"]))
        .watch_consent_changes(consent_pb::WatchConsentChangesRequest { after_cursor: 0 })
        .await
        .expect_err("the raw change stream holds profile ids");
    assert_eq!(status.code(), Code::PermissionDenied);

    let status = suite
        .profiles(suite.bearer(&["marketer"]))
        .upsert_profile(upsert_request("m@example.com"))
        .await
        .expect_err("marketers do not write profiles");
    assert_eq!(status.code(), Code::PermissionDenied);

    let status = suite
        .profiles(suite.bearer(&["no-such-role"]))
        .upsert_profile(upsert_request("x@example.com"))
        .await
        .expect_err("unknown roles get nothing");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Several roles: any one that allows is enough.
    suite
        .profiles(suite.bearer(&["marketer", "ingest"]))
        .upsert_profile(upsert_request("ok@example.com"))
        .await
        .expect("ingest may write");

    let mut policy = gateway_pb::policy_service_client::PolicyServiceClient::with_interceptor(
        suite.gateway_channel(),
        suite.bearer(&["compliance"]),
    );
    let status = policy
        .get_policy_status(gateway_pb::GetPolicyStatusRequest {})
        .await
        .expect("compliance reads the policy status")
        .into_inner();
    assert_eq!(status.version.len(), 64);
    assert!(status.files.contains(&"consent_policy.csv".to_string()));
    suite.stop().await;
}

#[tokio::test]
async fn health_answers_without_a_token() {
    let suite = Suite::start(Backend::Sqlite).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(suite.gateway_channel());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");
    assert_eq!(answer.get_ref().status(), ServingStatus::Serving);
    suite.stop().await;
}

#[tokio::test]
async fn reflection_lists_every_service_without_a_token() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let suite = Suite::start(Backend::Sqlite).await;
    let mut reflection = ServerReflectionClient::new(suite.gateway_channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection needs no token")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "madtech.activation.v1.ActivationService",
            "madtech.consent.v1.ConsentService",
            "madtech.consent.v1.PrivacyRequestService",
            "madtech.gateway.v1.AuditService",
            "madtech.gateway.v1.ConsentReleaseService",
            "madtech.gateway.v1.PolicyService",
            "madtech.profiles.v1.ProfileService",
            "madtech.segments.v1.SegmentService",
        ]
    );
    suite.stop().await;
}

#[tokio::test]
async fn reflection_can_be_put_behind_authentication() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.gateway.reflection_requires_token = true;
    })
    .await;
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = ServerReflectionClient::new(suite.gateway_channel())
        .server_reflection_info(tokio_stream::once(list()))
        .await
        .expect_err("no token, no reflection");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut answers =
        ServerReflectionClient::with_interceptor(suite.gateway_channel(), suite.bearer(&["admin"]))
            .server_reflection_info(tokio_stream::once(list()))
            .await
            .expect("with a token")
            .into_inner();
    assert!(answers.message().await.expect("answer").is_some());
    // Health stays open for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(suite.gateway_channel());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");
    suite.stop().await;
}

#[tokio::test]
async fn upstream_validation_errors_reach_the_caller_unchanged() {
    let suite = Suite::start(Backend::Sqlite).await;
    let status = suite
        .profiles(suite.bearer(&["admin"]))
        .upsert_profile(upsert_request("not-an-email"))
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("identifiers[0].value"),
        "{}",
        status.message()
    );

    let status = suite
        .consent(suite.bearer(&["admin"]))
        .record_consent(consent_pb::RecordConsentRequest {
            profile_id: "p".into(),
            choices: vec![],
            source: consent_pb::ConsentSource::Api.into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("choices"),
        "{}",
        status.message()
    );
    suite.stop().await;
}

#[tokio::test]
async fn the_crossing_never_releases_raw_data_whoever_asks() {
    let suite = Suite::start(Backend::Sqlite).await;
    let admin = suite.bearer(&["admin"]);
    suite
        .profiles(admin.clone())
        .upsert_profile(profiles_pb::UpsertProfileRequest {
            identifiers: vec![email("ca@example.com")],
            traits: Default::default(),
            region: "US-CA".into(),
            ..Default::default()
        })
        .await
        .expect("upsert");
    let segment = suite.region_segment("california", &["US-CA"]).await;
    let file = suite.destination_of_kind("file").await;
    let request = |segment_id: &str| segments_pb::ExportAudienceRequest {
        segment_id: segment_id.into(),
        destination_id: file.clone(),
        destination_kind: "file".into(),
        purpose: "ad_targeting".into(),
        snapshot_cursor: 0,
        current_membership: false,
    };
    // Even an admin gets only what may cross.
    let mut stream = suite
        .segments(admin.clone())
        .export_audience(request(&segment.segment_id))
        .await
        .expect("export")
        .into_inner();
    let mut members = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        members.extend(chunk.members);
    }
    assert_eq!(members.len(), 1);
    assert!(members[0].profile_id.is_empty());
    assert!(members[0].identifiers.is_empty());
    assert_eq!(members[0].pseudonymous_id.len(), 64);
    assert_eq!(members[0].hashed_identifiers.len(), 1);

    let status = suite
        .segments(admin.clone())
        .export_audience(request("no-such-segment"))
        .await
        .expect_err("unknown segment");
    assert_eq!(status.code(), Code::NotFound);

    let mut bad = request(&segment.segment_id);
    bad.purpose = "Ad Targeting".into();
    let status = suite
        .segments(admin.clone())
        .export_audience(bad)
        .await
        .expect_err("bad purpose");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("purpose"));

    // The destination's kind comes from the registry, never the caller: an
    // unregistered destination gets nothing, and a caller claiming a laxer
    // kind than the registered one is refused.
    let mut unregistered = request(&segment.segment_id);
    unregistered.destination_id = "made-up".into();
    let status = suite
        .segments(admin.clone())
        .export_audience(unregistered)
        .await
        .expect_err("unregistered destination");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("not registered"), "{status:?}");
    let mut mislabelled = request(&segment.segment_id);
    mislabelled.destination_id = suite.destination_of_kind("meta").await;
    let status = suite
        .segments(admin)
        .export_audience(mislabelled)
        .await
        .expect_err("a kind other than the registered one");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("destination_kind"),
        "{status:?}"
    );
    suite.stop().await;
}

#[tokio::test]
async fn odd_spellings_of_a_path_are_refused_without_harming_the_connection() {
    use tonic::codegen::http::uri::PathAndQuery;

    let suite = Suite::start(Backend::Sqlite).await;
    let channel = suite.gateway_channel();
    let authed =
        tonic::service::interceptor::InterceptedService::new(channel, suite.bearer(&["admin"]));
    let mut grpc = tonic::client::Grpc::new(authed);
    let request = segments_pb::ExportAudienceRequest {
        segment_id: "s".into(),
        destination_id: "d".into(),
        destination_kind: "file".into(),
        purpose: "ad_targeting".into(),
        snapshot_cursor: 0,
        current_membership: false,
    };
    for path in [
        "//madtech.segments.v1.SegmentService/ExportAudience",
        "/madtech.segments.v1.SegmentService/ExportAudience/",
        "/madtech.segments.v1.SegmentService/Export%41udience",
        "/madtech.segments.v1.SegmentService/Export\u{e9}Audience",
    ] {
        let Ok(path) = PathAndQuery::try_from(path) else {
            continue;
        };
        grpc.ready().await.expect("ready");
        let codec = tonic_prost::ProstCodec::<
            segments_pb::ExportAudienceRequest,
            segments_pb::ExportAudienceResponse,
        >::default();
        let status = grpc
            .server_streaming(tonic::Request::new(request.clone()), path.clone(), codec)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
    }
    // The same connection still serves.
    suite
        .profiles(suite.bearer(&["admin"]))
        .get_profile(profiles_pb::GetProfileRequest {
            lookup: Some(profiles_pb::get_profile_request::Lookup::ProfileId(
                "nobody".into(),
            )),
        })
        .await
        .expect_err("not found, but answered");
    suite.stop().await;
}

#[tokio::test]
async fn a_policy_change_takes_effect_without_a_restart_and_a_broken_one_is_ignored() {
    let (suite, policies) = Suite::start_with_own_policies(|_| {}).await;
    let get = || profiles_pb::GetProfileRequest {
        lookup: Some(profiles_pb::get_profile_request::Lookup::ProfileId(
            "nobody".into(),
        )),
    };
    let mut profiles = suite.profiles(suite.bearer(&["marketer"]));
    assert_eq!(
        profiles
            .get_profile(get())
            .await
            .expect_err("denied")
            .code(),
        Code::PermissionDenied
    );

    let rbac = policies.path().join("rbac_policy.csv");
    let mut text = std::fs::read_to_string(&rbac).expect("read");
    text.push_str("p, marketer, /madtech.profiles.v1.ProfileService/GetProfile\n");
    std::fs::write(&rbac, text).expect("write");
    let mut attempts = 0;
    loop {
        let code = profiles
            .get_profile(get())
            .await
            .expect_err("not found")
            .code();
        if code == Code::NotFound {
            break;
        }
        attempts += 1;
        assert!(attempts < 200, "the new rule never took effect");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    // A broken file changes nothing: the last good set keeps answering.
    std::fs::write(&rbac, "p, marketer\n").expect("break");
    let mut policy = gateway_pb::policy_service_client::PolicyServiceClient::with_interceptor(
        suite.gateway_channel(),
        suite.bearer(&["compliance"]),
    );
    let before = policy
        .get_policy_status(gateway_pb::GetPolicyStatusRequest {})
        .await
        .expect("status");
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            profiles
                .get_profile(get())
                .await
                .expect_err("not found")
                .code(),
            Code::NotFound
        );
    }
    let after = policy
        .get_policy_status(gateway_pb::GetPolicyStatusRequest {})
        .await
        .expect("status");
    assert_eq!(before.get_ref().version, after.get_ref().version);
    suite.stop().await;
}

#[tokio::test]
async fn every_kind_of_bad_token_is_unauthenticated() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use madtech_gateway::token::{Claims, DEV_PRIVATE_KEY, DEV_PUBLIC_KEY};

    let suite = Suite::start(Backend::Sqlite).await;
    let dir = &suite.config.data_dir;
    let private = std::fs::read(dir.join(DEV_PRIVATE_KEY)).expect("private key");
    let public = std::fs::read(dir.join(DEV_PUBLIC_KEY)).expect("public key");
    let key = EncodingKey::from_ed_pem(&private).expect("key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = Claims {
        sub: "mallory".into(),
        roles: vec!["admin".into()],
        iss: suite.config.gateway.auth.issuer.clone(),
        aud: suite.config.gateway.auth.audience.clone(),
        iat: now,
        nbf: now,
        exp: now + 600,
    };
    let signed = |claims: &Claims| {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key).expect("sign")
    };
    let valid = signed(&claims);
    let expired = signed(&Claims {
        iat: now - 7200,
        nbf: now - 7200,
        exp: now - 3600,
        ..claims.clone()
    });
    let not_yet = signed(&Claims {
        nbf: now + 3600,
        exp: now + 7200,
        ..claims.clone()
    });
    let wrong_audience = signed(&Claims {
        aud: "someone-else".into(),
        ..claims.clone()
    });
    let wrong_issuer = signed(&Claims {
        iss: "https://evil.example".into(),
        ..claims.clone()
    });
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
    let alg_none = format!(
        "{}.{payload}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
    );
    // The classic confusion: HMAC "signed" with the public key as secret.
    let hs256_with_public_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&public),
    )
    .expect("sign");
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
        let elevated = Claims {
            roles: vec!["admin".into(), "compliance".into()],
            ..claims.clone()
        };
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&elevated).expect("json"));
        parts.join(".")
    };

    let get = || profiles_pb::GetProfileRequest {
        lookup: Some(profiles_pb::get_profile_request::Lookup::ProfileId(
            "nobody".into(),
        )),
    };
    let status = suite
        .profiles(Suite::raw_bearer(&format!("Bearer {valid}")))
        .get_profile(get())
        .await
        .expect_err("not found");
    assert_eq!(
        status.code(),
        Code::NotFound,
        "the well-formed token is accepted"
    );
    for (what, token) in [
        ("expired", expired),
        ("not yet valid", not_yet),
        ("wrong audience", wrong_audience),
        ("wrong issuer", wrong_issuer),
        ("alg none", alg_none),
        ("HS256 with the public key", hs256_with_public_key),
        ("tampered payload", tampered),
    ] {
        let status = suite
            .profiles(Suite::raw_bearer(&format!("Bearer {token}")))
            .get_profile(get())
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    }
    suite.stop().await;
}

#[tokio::test]
async fn a_role_past_its_rate_limit_is_told_to_slow_down() {
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.gateway.rate_limits.insert("marketer".into(), 1);
    })
    .await;
    let mut marketer = suite.segments(suite.bearer(&["marketer"]));
    let mut codes = Vec::new();
    for _ in 0..5 {
        let status = marketer
            .get_segment(segments_pb::GetSegmentRequest {
                segment_id: "none".into(),
            })
            .await
            .expect_err("no such segment, or too many calls");
        codes.push(status.code());
    }
    assert_eq!(codes[0], Code::NotFound, "the first call is within budget");
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    // Other roles are not limited.
    let status = suite
        .segments(suite.bearer(&["admin"]))
        .get_segment(segments_pb::GetSegmentRequest {
            segment_id: "none".into(),
        })
        .await
        .expect_err("not found");
    assert_eq!(status.code(), Code::NotFound);
    suite.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_changes_nothing() {
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.gateway.max_request_message_bytes = 1024;
    })
    .await;
    let mut profiles = suite.profiles(suite.bearer(&["admin"]));
    let mut oversized = upsert_request("big@example.com");
    oversized.traits.insert(
        "notes".into(),
        profiles_pb::TraitValue {
            value: Some(profiles_pb::trait_value::Value::StringValue(
                "x".repeat(4096),
            )),
        },
    );
    let status = profiles
        .upsert_profile(oversized)
        .await
        .expect_err("larger than the limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("1024"), "{}", status.message());
    // The connection still serves, and nothing was written.
    let status = profiles
        .get_profile(get_by_email("big@example.com"))
        .await
        .expect_err("nothing was created");
    assert_eq!(status.code(), Code::NotFound);
    profiles
        .upsert_profile(upsert_request("small@example.com"))
        .await
        .expect("a message within the limit passes");
    suite.stop().await;
}
