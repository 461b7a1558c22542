use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use madtech_common::db::connect_and_migrate;
use madtech_common::testing::{Backend, TestDatabase};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::*;
use crate::rules::eval::{Context, MICROS_PER_DAY};
use crate::rules::{Cmp, EventFilter, EventMeasure, Test};
use crate::store::Migrator;

const NOW: i64 = 1_800_000_000_000_000;

async fn projection(db: &TestDatabase) -> Projection {
    connected(db).await.2
}

/// The migrated database, its write lock and a projection over them.
async fn connected(
    db: &TestDatabase,
) -> (
    sea_orm::DatabaseConnection,
    crate::store::WriteLock,
    Projection,
) {
    let conn = connect_and_migrate::<Migrator>(&db.config)
        .await
        .expect("connect");
    let writes = crate::store::WriteLock::default();
    let projection = Projection::new(conn.clone(), std::sync::Arc::clone(&writes));
    (conn, writes, projection)
}

fn value() -> impl Strategy<Value = Stored> {
    prop_oneof![
        prop_oneof![Just("x"), Just("xy"), Just("y"), Just("É")]
            .prop_map(|s| Stored::Value(Value::String(s.into()))),
        prop_oneof![Just(1.0), Just(2.0), Just(3.5), Just(-1.0)]
            .prop_map(|n| Stored::Value(Value::Number(n))),
        any::<bool>().prop_map(|b| Stored::Value(Value::Bool(b))),
        prop_oneof![Just(NOW - MICROS_PER_DAY), Just(NOW)]
            .prop_map(|t| Stored::Value(Value::Timestamp(t))),
        Just(Stored::Other),
    ]
}

fn literal() -> impl Strategy<Value = Value> {
    value().prop_map(|v| match v {
        Stored::Value(v) => v,
        Stored::Other => Value::String("x".into()),
    })
}

fn test() -> impl Strategy<Value = Test> {
    prop_oneof![
        Just(Test::Exists),
        literal().prop_map(Test::Equals),
        prop::collection::vec(literal(), 0..3).prop_map(Test::In),
        (
            cmp(),
            prop_oneof![
                prop_oneof![Just(1.0), Just(2.0), Just(3.0)].prop_map(Value::Number),
                prop_oneof![Just(NOW - MICROS_PER_DAY), Just(NOW)].prop_map(Value::Timestamp),
            ]
        )
            .prop_map(|(cmp, v)| Test::Compare(cmp, v)),
        prop_oneof![Just(""), Just("x"), Just("É")].prop_map(|s| Test::Prefix(s.into())),
        prop_oneof![Just("y"), Just("xy"), Just("z")].prop_map(|s| Test::Contains(s.into())),
    ]
}

fn cmp() -> impl Strategy<Value = Cmp> {
    prop_oneof![
        Just(Cmp::Lt),
        Just(Cmp::Le),
        Just(Cmp::Eq),
        Just(Cmp::Ne),
        Just(Cmp::Ge),
        Just(Cmp::Gt)
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    let leaf = prop_oneof![
        (prop_oneof![Just("a"), Just("b"), Just("zz")], test()).prop_map(|(name, test)| {
            Rule::Trait {
                name: name.into(),
                test,
            }
        }),
        prop_oneof![Just("email"), Just("phone")].prop_map(|k| Rule::HasIdentifier(k.into())),
        prop::collection::btree_set(prop_oneof![Just("FR"), Just("US-CA")], 0..3).prop_map(|set| {
            Rule::RegionIn(set.into_iter().map(String::from).collect::<BTreeSet<_>>())
        }),
        (
            prop_oneof![Just("buy"), Just("view")],
            prop::collection::vec((prop_oneof![Just("amount"), Just("cur")], test()), 0..2),
            prop_oneof![
                (prop_oneof![Just(1u32), Just(7), Just(30)], cmp(), 0u32..3)
                    .prop_map(|(days, cmp, count)| EventMeasure::Count { days, cmp, count }),
                prop_oneof![Just(1u32), Just(7), Just(30)]
                    .prop_map(|days| EventMeasure::LastBefore { days }),
                prop_oneof![Just(1u32), Just(7), Just(30)]
                    .prop_map(|days| EventMeasure::LastAfter { days }),
            ]
        )
            .prop_map(|(name, properties, measure)| Rule::Event {
                filter: EventFilter {
                    name: name.into(),
                    properties: properties.into_iter().map(|(n, t)| (n.into(), t)).collect(),
                },
                measure,
            }),
        Just(Rule::InSegment("base".into())),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Rule::All),
            prop::collection::vec(inner.clone(), 0..3).prop_map(Rule::Any),
            inner.prop_map(|r| Rule::Not(Box::new(r))),
        ]
    })
}

/// The rule `in_segment("base")` refers to in the tests.
fn base_rule() -> Rule {
    Rule::Any(vec![
        Rule::HasIdentifier("phone".into()),
        Rule::Trait {
            name: "a".into(),
            test: Test::Exists,
        },
    ])
}

fn person() -> impl Strategy<Value = Person> {
    (
        prop_oneof![Just("FR"), Just("US-CA"), Just("")],
        prop::collection::btree_map(prop_oneof![Just("a"), Just("b")], value(), 0..3),
        prop::collection::btree_set(prop_oneof![Just("email"), Just("phone")], 0..3),
        prop::collection::vec(
            (
                prop_oneof![Just("buy"), Just("view")],
                0i64..40,
                // Exactly on a window's edge, just outside it, or well inside.
                prop_oneof![Just(0i64), Just(1), Just(MICROS_PER_DAY / 2)],
                prop::collection::btree_map(
                    prop_oneof![Just("amount"), Just("cur")],
                    value(),
                    0..3,
                ),
            ),
            0..5,
        ),
    )
        .prop_map(|(region, traits, kinds, events)| Person {
            region: region.into(),
            traits: traits.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            identifier_kinds: kinds.into_iter().map(String::from).collect(),
            events: events
                .into_iter()
                .map(|(name, days_ago, offset, properties)| PersonEvent {
                    name: name.into(),
                    // Both evaluations use the same fixed "now", so window
                    // edges are exact on both sides.
                    occurred_at_micros: NOW - days_ago * MICROS_PER_DAY - offset,
                    properties: properties.into_iter().map(|(k, v)| (k.into(), v)).collect(),
                })
                .collect(),
        })
}

// From 1, so the id before a case's first is a valid page cursor.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_CURSOR: AtomicU64 = AtomicU64::new(1);

/// Gives `changes` the next cursors of the (test-wide) stream.
fn numbered(changes: Vec<Change>) -> Vec<(u64, Change)> {
    changes
        .into_iter()
        .map(|c| (NEXT_CURSOR.fetch_add(1, Ordering::Relaxed), c))
        .collect()
}

async fn load(projection: &Projection, people: &[Person]) -> Vec<String> {
    let mut ids = Vec::new();
    let mut changes = Vec::new();
    for person in people {
        let id = format!("p{:08}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        changes.push(Change::Upserted(Snapshot {
            profile_id: id.clone(),
            region: person.region.clone(),
            identifiers: person
                .identifier_kinds
                .iter()
                .map(|kind| (kind.clone(), format!("{kind}-of-{id}")))
                .collect(),
            merged_ids: Vec::new(),
            traits: person.traits.clone(),
        }));
        changes.push(Change::Events(
            person
                .events
                .iter()
                .map(|e| NewEvent {
                    profile_id: id.clone(),
                    name: e.name.clone(),
                    occurred_at_micros: e.occurred_at_micros,
                    properties: e.properties.clone(),
                })
                .collect(),
        ));
        ids.push(id);
    }
    projection.apply(&numbered(changes)).await.expect("apply");
    ids
}

async fn agree(
    projection: &Projection,
    people: &[Person],
    rule: &Rule,
) -> Result<(), TestCaseError> {
    let ids = load(projection, people).await;
    let base = base_rule();
    let segments = BTreeMap::from([("base".to_string(), base.clone())]);
    let compiler = Compiler {
        backend: projection.backend(),
        now_micros: NOW,
        segments: &segments,
    };
    let by_sql: BTreeSet<String> = projection
        .members(Selection::Rule(rule, &compiler), "", 1_000_000)
        .await
        .map_err(|err| TestCaseError::fail(err.to_string()))?
        .into_iter()
        .map(|m| m.profile_id)
        .filter(|id| ids.contains(id))
        .collect();
    // A computation's pages and real time's id lists compile differently
    // (set-based over a page, per person over a list); both must agree too.
    // Pages of two put page boundaries among this case's people.
    let first: u64 = ids[0][1..].parse().expect("numbered id");
    let mut after = format!("p{:08}", first - 1);
    let mut by_page = BTreeSet::new();
    loop {
        let page = projection
            .evaluate_page(rule, &compiler, &after, 2)
            .await
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        let Some((last, _)) = page.last() else { break };
        after = last.clone();
        by_page.extend(page.into_iter().filter(|(_, m)| *m).map(|(id, _)| id));
    }
    let by_ids: BTreeSet<String> = projection
        .evaluate_ids(rule, &compiler, &ids)
        .await
        .map_err(|err| TestCaseError::fail(err.to_string()))?
        .into_iter()
        .filter(|(_, m)| *m)
        .map(|(id, _)| id)
        .collect();
    let mut in_memory = BTreeSet::new();
    for (id, generated) in ids.iter().zip(people) {
        // Read back from the projection, so storage round trips are checked
        // too.
        let stored = projection
            .person(id)
            .await
            .map_err(|err| TestCaseError::fail(err.to_string()))?
            .ok_or_else(|| TestCaseError::fail("person not stored"))?;
        prop_assert_eq!(&stored.traits, &generated.traits);
        let member_of = |segment: &str| {
            segment == "base"
                && base.matches(
                    &stored,
                    &Context {
                        now_micros: NOW,
                        member_of: &|_| false,
                    },
                )
        };
        let context = Context {
            now_micros: NOW,
            member_of: &member_of,
        };
        if rule.matches(&stored, &context) {
            in_memory.insert(id.clone());
        }
    }
    let printed = crate::rules::text::print(rule);
    prop_assert_eq!(&by_sql, &in_memory, "export, rule: {}", printed);
    prop_assert_eq!(&by_page, &in_memory, "pages, rule: {}", printed);
    prop_assert_eq!(&by_ids, &in_memory, "id list, rule: {}", printed);
    Ok(())
}

fn sql_and_memory_agree(backend: Backend, cases: u32) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = TestDatabase::new(backend);
    let projection = runtime.block_on(projection(&db));
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(prop::collection::vec(person(), 1..6), rule()),
            |(people, rule)| runtime.block_on(agree(&projection, &people, &rule)),
        )
        .expect("SQL and in-memory evaluation agree");
}

#[test]
fn sqlite_sql_and_memory_agree_on_random_rules_and_people() {
    sql_and_memory_agree(Backend::Sqlite, 200);
}

#[test]
fn postgres_sql_and_memory_agree_on_random_rules_and_people() {
    sql_and_memory_agree(Backend::Postgres, 100);
}

madtech_common::backend_tests!(
    the_projection_follows_merges_and_erasures,
    |db: TestDatabase| async move {
        let projection = projection(&db).await;
        let snapshot = |id: &str, email: &str| {
            Change::Upserted(Snapshot {
                profile_id: id.into(),
                region: "FR".into(),
                identifiers: vec![("email".into(), email.into())],
                merged_ids: Vec::new(),
                traits: BTreeMap::new(),
            })
        };
        let view = |id: &str| {
            Change::Events(vec![NewEvent {
                profile_id: id.into(),
                name: "view".into(),
                occurred_at_micros: NOW,
                properties: BTreeMap::new(),
            }])
        };
        let first = vec![
            (1, snapshot("a", "a@x.io")),
            (2, snapshot("b", "b@x.io")),
            (3, view("b")),
        ];
        projection.apply(&first).await.expect("apply");
        assert_eq!(projection.cursor().await.expect("cursor"), 3);
        // The same page again (a retry, or a second replica) changes nothing.
        projection.apply(&first).await.expect("again");
        let b = projection.person("b").await.expect("read").expect("b");
        assert_eq!(b.events.len(), 1, "events are not applied twice");
        let mut survivor = Snapshot {
            profile_id: "a".into(),
            region: "FR".into(),
            identifiers: vec![
                ("email".into(), "a@x.io".into()),
                ("email".into(), "b@x.io".into()),
            ],
            merged_ids: vec!["b".into()],
            traits: BTreeMap::new(),
        };
        projection
            .apply(&[
                (
                    4,
                    Change::Merged {
                        survivor: "a".into(),
                        merged: vec!["b".into()],
                    },
                ),
                (5, Change::Upserted(survivor.clone())),
            ])
            .await
            .expect("merge");
        assert!(projection.person("b").await.expect("read").is_none());
        let a = projection.person("a").await.expect("read").expect("a");
        assert_eq!(a.events.len(), 1, "b's event moved to a");
        let members = export(&projection).await.expect("members");
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].merged_ids, vec!["b".to_string()]);
        assert_eq!(members[0].identifiers.len(), 2);

        survivor.traits.clear();
        projection
            .apply(&[(
                6,
                Change::Erased {
                    profile_ids: vec!["a".into(), "b".into()],
                },
            )])
            .await
            .expect("erase");
        assert!(projection.person("a").await.expect("read").is_none());
        assert!(export(&projection).await.expect("members").is_empty());
        assert_eq!(projection.cursor().await.expect("cursor"), 6);
    }
);

madtech_common::backend_tests!(
    memberships_record_entries_exits_and_erasures,
    |db: TestDatabase| async move {
        let (conn, writes, projection) = connected(&db).await;
        let memberships = crate::store::membership::Memberships::new(conn, writes);
        let person = |id: &str| {
            Change::Upserted(Snapshot {
                profile_id: id.into(),
                region: "FR".into(),
                identifiers: Vec::new(),
                merged_ids: Vec::new(),
                traits: BTreeMap::new(),
            })
        };
        projection
            .apply(&numbered(vec![person("a"), person("b")]))
            .await
            .expect("people");
        let (entered, exited) = memberships
            .reconcile("s", &[("a".into(), true), ("b".into(), true)], NOW)
            .await
            .expect("first");
        assert_eq!((entered, exited), (2, 0));
        let snapshot = memberships.head().await.expect("head");
        let again = memberships
            .reconcile("s", &[("a".into(), true), ("b".into(), false)], NOW)
            .await
            .expect("second");
        assert_eq!(again, (0, 1), "only changes are recorded");
        let projection = &projection;
        let as_of = |cursor| async move {
            projection
                .members(
                    Selection::Snapshot {
                        segment_id: "s",
                        cursor,
                    },
                    "",
                    10,
                )
                .await
                .expect("snapshot")
                .into_iter()
                .map(|m| m.profile_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            as_of(snapshot).await,
            vec!["a", "b"],
            "the first computation, reproduced"
        );
        let now = memberships.head().await.expect("head");
        assert_eq!(as_of(now).await, vec!["a"]);
        projection
            .apply(&numbered(vec![Change::Erased {
                profile_ids: vec!["a".into()],
            }]))
            .await
            .expect("erase");
        assert_eq!(memberships.count("s").await.expect("count"), 0);
        assert_eq!(
            as_of(snapshot).await,
            vec!["b"],
            "an old snapshot never brings an erased person back"
        );
        let log: Vec<(String, bool)> = memberships
            .changes_after("s", 0, 10)
            .await
            .expect("log")
            .into_iter()
            .map(|c| (c.profile_id, c.entered))
            .collect();
        assert_eq!(
            log,
            vec![
                ("a".into(), true),
                ("b".into(), true),
                ("b".into(), false),
                ("a".into(), false)
            ]
        );
        assert!(
            memberships
                .changes_after("other", 0, 10)
                .await
                .expect("log")
                .is_empty()
        );
    }
);

madtech_common::backend_tests!(
    a_page_is_written_in_runs_and_the_last_snapshot_of_a_person_wins,
    |db: TestDatabase| async move {
        let projection = projection(&db).await;
        let snapshot = |id: &str, region: &str, tier: f64| {
            Change::Upserted(Snapshot {
                profile_id: id.into(),
                region: region.into(),
                identifiers: vec![("email".into(), format!("{id}@x.io"))],
                merged_ids: Vec::new(),
                traits: BTreeMap::from([("tier".to_string(), Stored::Value(Value::Number(tier)))]),
            })
        };
        let bought = |id: &str, amount: f64| NewEvent {
            profile_id: id.into(),
            name: "purchase".into(),
            occurred_at_micros: NOW,
            properties: BTreeMap::from([(
                "amount".to_string(),
                Stored::Value(Value::Number(amount)),
            )]),
        };
        let page = vec![
            (10, snapshot("a", "FR", 1.0)),
            (11, snapshot("b", "FR", 1.0)),
            (12, snapshot("a", "DE", 2.0)),
            (13, Change::Events(vec![bought("a", 5.0), bought("a", 7.0)])),
            (14, Change::Events(vec![bought("b", 9.0)])),
            (15, snapshot("a", "DE", 3.0)),
        ];
        projection.apply(&page).await.expect("apply");
        let a = projection.person("a").await.expect("read").expect("a");
        assert_eq!(a.region, "DE");
        assert_eq!(a.traits["tier"], Stored::Value(Value::Number(3.0)));
        assert_eq!(a.events.len(), 2, "a later snapshot keeps the events");
        let mut amounts: Vec<String> = a
            .events
            .iter()
            .map(|e| format!("{:?}", e.properties["amount"]))
            .collect();
        amounts.sort();
        assert_eq!(amounts.len(), 2);
        assert_ne!(
            amounts[0], amounts[1],
            "each event keeps its own properties"
        );
        let b = projection.person("b").await.expect("read").expect("b");
        assert_eq!(b.events.len(), 1);
        assert_eq!(projection.people().await.expect("count"), 2);
    }
);

/// Everyone in the projection, as an export sends them.
async fn export(projection: &Projection) -> Result<Vec<Member>, SegmentError> {
    let everyone = Rule::All(Vec::new());
    let no_segments = BTreeMap::new();
    let compiler = Compiler {
        backend: projection.backend(),
        now_micros: NOW,
        segments: &no_segments,
    };
    projection
        .members(Selection::Rule(&everyone, &compiler), "", 10)
        .await
}

madtech_common::backend_tests!(
    export_documents_are_built_at_start_and_rebuilt_when_their_key_changes,
    |db: TestDatabase| async move {
        let (conn, writes, projection) = connected(&db).await;
        assert_eq!(projection.prepare_export_docs().await.expect("empty"), 0);
        let born = |id: &str| {
            Change::Upserted(Snapshot {
                profile_id: id.into(),
                region: "DE".into(),
                identifiers: vec![
                    ("phone".into(), "+4915112345678".into()),
                    ("email".into(), format!("{id}@x.io")),
                ],
                merged_ids: vec![format!("{id}-2"), format!("{id}-1")],
                traits: BTreeMap::from([
                    (
                        "birthdate".to_string(),
                        Stored::Value(Value::String("1990-05-17".into())),
                    ),
                    (
                        "dob".to_string(),
                        // 2001-02-03T04:05:06Z
                        Stored::Value(Value::Timestamp(981_173_106_000_000)),
                    ),
                ]),
            })
        };
        projection
            .apply(&numbered(vec![born("a"), born("b")]))
            .await
            .expect("apply");
        let written = export(&projection).await.expect("export");
        assert_eq!(written.len(), 2);
        assert_eq!(
            written[0],
            Member {
                profile_id: "a".into(),
                region: "DE".into(),
                identifiers: vec![
                    ("email".into(), "a@x.io".into()),
                    ("phone".into(), "+4915112345678".into()),
                ],
                merged_ids: vec!["a-1".into(), "a-2".into()],
                birth_date: Some("1990-05-17".into()),
            }
        );

        // An upgrade from before documents: the export refuses to leave
        // anyone out, and the start builds them from the tables.
        conn.execute_unprepared("UPDATE people SET export_doc = NULL")
            .await
            .expect("clear");
        let err = export(&projection)
            .await
            .expect_err("people without documents");
        assert!(matches!(err, SegmentError::Corrupt(_)), "{err}");
        assert_eq!(projection.prepare_export_docs().await.expect("build"), 2);
        assert_eq!(export(&projection).await.expect("export"), written);
        assert_eq!(projection.prepare_export_docs().await.expect("again"), 0);

        // Another birth-date trait configured: every document is rebuilt.
        let by_dob = Projection::new(conn.clone(), writes).with_birth_date_trait("dob");
        assert_eq!(by_dob.prepare_export_docs().await.expect("rebuild"), 2);
        let rebuilt = export(&by_dob).await.expect("export");
        assert_eq!(rebuilt[1].birth_date.as_deref(), Some("2001-02-03"));
        assert_eq!(rebuilt[1].identifiers, written[1].identifiers);
    }
);

madtech_common::backend_tests!(
    postgres_statistics_are_refreshed_each_time_the_writes_double,
    |db: TestDatabase| async move {
        let (conn, _, projection) = connected(&db).await;
        let postgres = conn.get_database_backend() == DbBackend::Postgres;
        let people: Vec<(u64, Change)> = (1..=3)
            .map(|i| {
                let id = format!("p{i}");
                (
                    i,
                    Change::Upserted(Snapshot {
                        profile_id: id.clone(),
                        region: "FR".into(),
                        identifiers: vec![("email".into(), format!("{id}@x.io"))],
                        merged_ids: Vec::new(),
                        traits: BTreeMap::new(),
                    }),
                )
            })
            .collect();
        projection.apply(&people).await.expect("apply");
        let statistics = &projection.statistics;
        // The three people applied count towards the first 10,000 rows.
        assert!(!statistics.wrote(&conn, 9_996).await);
        assert_eq!(statistics.wrote(&conn, 1).await, postgres, "10,000 rows");
        if postgres {
            let analysed = number(
                &conn,
                &Sql::new(
                    "SELECT count(*) AS n FROM pg_stats WHERE schemaname = current_schema() \
                     AND tablename = 'people'",
                ),
            )
            .await
            .expect("pg_stats");
            assert!(analysed > 0, "people has statistics");
        }
        assert!(!statistics.wrote(&conn, 9_999).await, "19,999 rows");
        assert_eq!(
            statistics.wrote(&conn, 1).await,
            postgres,
            "20,000 rows: doubled"
        );
    }
);
