//! Realistic synthetic people and events, for demos and benchmarks: the same
//! seed always gives the same data, person `i` is the same whatever the
//! total, and everything goes in through the public gRPC API (the gateway,
//! or a profiles service directly).

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use madtech_proto::profiles::v1 as pb;
use pb::profile_service_client::ProfileServiceClient;
use pb::trait_value::Value;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Status;
use tonic::client::GrpcService;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Plan {
    pub profiles: u64,
    pub events_per_profile: u32,
    pub seed: u64,
    /// People per `BatchUpsertProfiles` call.
    pub profiles_per_batch: usize,
    /// Events per `IngestEvents` call.
    pub events_per_batch: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Events fall in the `history` before `now`.
    pub now: DateTime<Utc>,
    pub history: Duration,
}

impl Plan {
    pub fn new(profiles: u64, events_per_profile: u32) -> Self {
        Plan {
            profiles,
            events_per_profile,
            seed: 42,
            profiles_per_batch: 500,
            events_per_batch: 1_000,
            concurrency: 2,
            now: Utc::now(),
            history: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Regions people live in, weighted roughly like a European retailer with a
/// US business.
const REGIONS: [(&str, u32); 9] = [
    ("FR", 25),
    ("DE", 20),
    ("GB", 12),
    ("ES", 8),
    ("IT", 8),
    ("US-CA", 12),
    ("US-NY", 7),
    ("US-TX", 6),
    ("US-VA", 2),
];
const DOMAINS: [&str; 6] = [
    "gmail.com",
    "yahoo.fr",
    "outlook.com",
    "example.org",
    "web.de",
    "icloud.com",
];
const FIRST: [&str; 12] = [
    "ann", "bob", "chloe", "david", "emma", "felix", "gina", "hugo", "ines", "jonas", "lea",
    "marco",
];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];

fn string(s: impl Into<String>) -> pb::TraitValue {
    pb::TraitValue {
        value: Some(Value::StringValue(s.into())),
    }
}

fn number(n: f64) -> pb::TraitValue {
    pb::TraitValue {
        value: Some(Value::NumberValue(n)),
    }
}

fn id(kind: &str, value: String) -> pb::Identifier {
    pb::Identifier {
        kind: kind.into(),
        value,
    }
}

/// The generator for person `i`: the same for the same seed.
fn rng_for(seed: u64, i: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn pick_region(rng: &mut StdRng) -> &'static str {
    let total: u32 = REGIONS.iter().map(|(_, w)| w).sum();
    let mut roll = rng.random_range(0..total);
    for (region, weight) in REGIONS {
        if roll < weight {
            return region;
        }
        roll -= weight;
    }
    REGIONS[0].0
}

/// A mobile number valid in the region's numbering plan, unique per person
/// (derived from `i`, so two people never share one and merge); `None`
/// where the plan leaves too little room for that.
fn phone(region: &str, i: u64) -> Option<String> {
    Some(match region {
        "FR" => format!("+33612{:06}", i % 1_000_000),
        "DE" => format!("+49151{:08}", i % 100_000_000),
        "GB" => format!("+44740{:07}", i % 10_000_000),
        "ES" => format!("+346{:08}", i % 100_000_000),
        "IT" => format!("+39347{:07}", i % 10_000_000),
        _ => return None,
    })
}

/// The customer id of person `i` of a seed's data, which events use to
/// find them.
pub fn customer_id(seed: u64, i: u64) -> String {
    format!("C{seed}-{i:09}")
}

/// The upsert that creates person `i`.
pub fn person(seed: u64, i: u64, now: DateTime<Utc>) -> pb::UpsertProfileRequest {
    let mut rng = rng_for(seed, i);
    let region = pick_region(&mut rng);
    let first = FIRST[rng.random_range(0..FIRST.len())];
    let domain = DOMAINS[rng.random_range(0..DOMAINS.len())];
    let mut identifiers = vec![
        id("customer_id", customer_id(seed, i)),
        id("email", format!("{first}.{i}@{domain}")),
        id("cookie_id", format!("ck-{seed}-{i}")),
    ];
    if rng.random_bool(0.6)
        && let Some(number) = phone(region, i)
    {
        identifiers.push(id("phone", number));
    }
    if rng.random_bool(0.3) {
        identifiers.push(id("maid", uuid::Uuid::from_u128(rng.random()).to_string()));
    }
    let signup_days = rng.random_range(1..1_500i64);
    let signup = now - chrono::Duration::days(signup_days);
    let traits = [
        ("plan", string(PLANS[rng.random_range(0..PLANS.len())])),
        (
            "lifetime_value",
            number((rng.random_range(0.0..2_000.0f64) * 100.0).round() / 100.0),
        ),
        (
            "newsletter",
            pb::TraitValue {
                value: Some(Value::BoolValue(rng.random_bool(0.4))),
            },
        ),
        (
            "signup_at",
            pb::TraitValue {
                value: Some(Value::TimestampValue(prost_types::Timestamp {
                    seconds: signup.timestamp(),
                    nanos: 0,
                })),
            },
        ),
        (
            "age_band",
            string(["18-24", "25-34", "35-44", "45-54", "55+"][rng.random_range(0..5)]),
        ),
    ];
    pb::UpsertProfileRequest {
        identifiers,
        traits: traits
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        region: region.into(),
        source: "generator".into(),
        ..Default::default()
    }
}

/// Event `j` of person `i`.
pub fn event(plan: &Plan, i: u64, j: u32) -> pb::Event {
    let mut rng = rng_for(plan.seed ^ 0xE7E7, (i << 20) | u64::from(j));
    let ago = rng.random_range(0..plan.history.as_secs().max(1));
    let at = plan.now - chrono::Duration::seconds(ago as i64);
    let roll = rng.random_range(0..100);
    let (name, properties) = if roll < 70 {
        let page = ["/", "/shoes", "/bags", "/sale", "/account"][rng.random_range(0..5)];
        ("page_view", vec![("path", string(page))])
    } else if roll < 90 {
        (
            "add_to_cart",
            vec![("sku", string(format!("SKU-{}", rng.random_range(1..5_000))))],
        )
    } else {
        let amount = (rng.random_range(5.0..500.0f64) * 100.0).round() / 100.0;
        (
            "purchase",
            vec![
                ("amount", number(amount)),
                (
                    "currency",
                    string(if rng.random_bool(0.7) { "EUR" } else { "USD" }),
                ),
            ],
        )
    };
    pb::Event {
        message_id: format!("gen-{}-{i}-{j}", plan.seed),
        name: name.into(),
        timestamp: Some(prost_types::Timestamp {
            seconds: at.timestamp(),
            nanos: 0,
        }),
        properties: properties
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        identifiers: vec![id("customer_id", customer_id(plan.seed, i))],
        source: "generator".into(),
        ..Default::default()
    }
}

/// One unit of work: a batch of people, then their events.
enum Call {
    People(pb::BatchUpsertProfilesRequest),
    Events(pb::IngestEventsRequest),
}

/// Progress so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub profiles: u64,
    pub events: u64,
}

/// Sends everything `plan` describes through `client`; `progress` is told
/// after each acknowledged call. Retries are safe: people are upserts and
/// events carry stable message ids.
pub async fn run<T>(
    client: ProfileServiceClient<T>,
    plan: &Plan,
    mut progress: impl FnMut(Progress),
) -> Result<Progress, Status>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let per_batch = plan.profiles_per_batch.max(1) as u64;
    // One unit per batch of people: the people, then their events, in
    // order (events find their person by customer id); units overlap.
    let units =
        futures::stream::iter((0..plan.profiles).step_by(per_batch as usize)).map(move |start| {
            let end = (start + per_batch).min(plan.profiles);
            let mut calls = vec![Call::People(pb::BatchUpsertProfilesRequest {
                upserts: (start..end)
                    .map(|i| person(plan.seed, i, plan.now))
                    .collect(),
            })];
            let events: Vec<pb::Event> = (start..end)
                .flat_map(|i| (0..plan.events_per_profile).map(move |j| (i, j)))
                .map(|(i, j)| event(plan, i, j))
                .collect();
            calls.extend(events.chunks(plan.events_per_batch.max(1)).map(|chunk| {
                Call::Events(pb::IngestEventsRequest {
                    events: chunk.to_vec(),
                })
            }));
            calls
        });
    let mut done = Progress::default();
    let mut sends = units
        .map(|calls| {
            let mut client = client.clone();
            async move {
                let mut sent = Progress::default();
                for call in calls {
                    match call {
                        Call::People(request) => {
                            sent.profiles += request.upserts.len() as u64;
                            client.batch_upsert_profiles(request).await?;
                        }
                        Call::Events(request) => {
                            sent.events += request.events.len() as u64;
                            client.ingest_events(request).await?;
                        }
                    }
                }
                Ok::<_, Status>(sent)
            }
        })
        .buffered(plan.concurrency.max(1));
    while let Some(sent) = sends.try_next().await? {
        done.profiles += sent.profiles;
        done.events += sent.events;
        progress(done);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_are_deterministic_and_distinct() {
        let now = Utc::now();
        assert_eq!(person(7, 3, now), person(7, 3, now));
        assert_ne!(person(7, 3, now).identifiers, person(7, 4, now).identifiers);
        assert_ne!(person(7, 3, now).identifiers, person(8, 3, now).identifiers);
        let plan = Plan::new(10, 5);
        assert_eq!(event(&plan, 2, 1), event(&plan, 2, 1));
        assert_ne!(event(&plan, 2, 1).message_id, event(&plan, 2, 2).message_id);
    }

    #[test]
    fn generated_identifiers_normalise() {
        let normaliser = madtech_profiles::identity::Normaliser::new("US").expect("region");
        let now = Utc::now();
        for i in (0..3_000).chain(999_000..1_000_000) {
            for id in person(42, i, now).identifiers {
                normaliser
                    .normalise("id", &id.kind, &id.value)
                    .unwrap_or_else(|err| panic!("{}={}: {err}", id.kind, id.value));
            }
        }
    }
}
