use super::*;
use crate::identity::Normaliser;
use crate::traits::TraitValue;
use madtech_common::db::connect_and_migrate;
use madtech_common::testing::TestDatabase;

const RULES: &str = r#"
    blocked = [{ kind = "email", value = "test@example.com" }]
    [kinds.customer_id]
    limit = 1
    priority = 1
    [kinds.email]
    limit = 3
    priority = 2
    [kinds.cookie_id]
    priority = 9
"#;

async fn store(db: &TestDatabase) -> ProfileStore {
    let conn = connect_and_migrate::<Migrator>(&db.config)
        .await
        .expect("connect");
    ProfileStore::new(
        conn.clone(),
        conn,
        IdentityRules::parse(RULES, "FR").expect("rules"),
    )
    .expect("store")
}

fn value(profile: &Profile, name: &str) -> TraitValue {
    profile.traits[name].value.clone()
}

fn ids(pairs: &[(&str, &str)]) -> BTreeSet<Identifier> {
    let normaliser = Normaliser::new("FR").expect("region");
    pairs
        .iter()
        .map(|(kind, value)| normaliser.normalise("id", kind, value).expect("valid"))
        .collect()
}

fn upsert(pairs: &[(&str, &str)], traits: &[(&str, TraitValue)], region: &str) -> Upsert {
    Upsert {
        identifiers: ids(pairs),
        operations: traits
            .iter()
            .map(|(k, v)| TraitOperation::Set(k.to_string(), v.clone()))
            .collect(),
        region: region.into(),
        source: "api".into(),
        observed_at: None,
    }
}

madtech_common::backend_tests!(upsert_creates_then_updates, |db: TestDatabase| async move {
    let store = store(&db).await;
    let first = store
        .upsert(upsert(
            &[("email", "Ann@Example.com")],
            &[("tier", TraitValue::String("gold".into()))],
            "FR",
        ))
        .await
        .expect("create");
    assert!(first.created);
    let again = store
        .upsert(upsert(
            &[("email", "ann@example.com"), ("customer_id", "C1")],
            &[("visits", TraitValue::Number(3.0))],
            "",
        ))
        .await
        .expect("update");
    assert!(!again.created);
    assert_eq!(again.profile.id, first.profile.id);
    assert_eq!(
        again.profile.region, "FR",
        "an empty region keeps the old one"
    );
    assert_eq!(again.profile.identifiers.len(), 2);
    assert_eq!(again.profile.traits.len(), 2);

    let by_customer = store
        .find_by_identifier(
            &ids(&[("customer_id", "C1")])
                .into_iter()
                .next()
                .expect("one"),
        )
        .await
        .expect("found");
    assert_eq!(by_customer.id, first.profile.id);
});

madtech_common::backend_tests!(
    shared_identifiers_merge_into_the_oldest,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let older = store
            .upsert(upsert(
                &[("email", "a@example.com")],
                &[("tier", TraitValue::String("gold".into()))],
                "FR",
            ))
            .await
            .expect("a");
        let newer = store
            .upsert(upsert(
                &[("customer_id", "C9")],
                &[
                    ("tier", TraitValue::String("silver".into())),
                    ("age", TraitValue::Number(40.0)),
                ],
                "DE",
            ))
            .await
            .expect("b");
        let joined = store
            .upsert(upsert(
                &[("email", "a@example.com"), ("customer_id", "C9")],
                &[],
                "",
            ))
            .await
            .expect("merge");
        assert_eq!(joined.profile.id, older.profile.id);
        assert_eq!(joined.merged, vec![newer.profile.id.clone()]);
        assert_eq!(
            value(&joined.profile, "tier"),
            TraitValue::String("silver".into()),
            "the value observed last wins"
        );
        assert_eq!(
            value(&joined.profile, "age"),
            TraitValue::Number(40.0),
            "absorbed traits are kept"
        );
        assert_eq!(joined.profile.region, "FR");

        let via_old_id = store
            .get(&newer.profile.id)
            .await
            .expect("merged id resolves");
        assert_eq!(via_old_id.id, older.profile.id);

        let listed = store.list_page("", 10).await.expect("list");
        assert_eq!(listed.len(), 1, "merged-away profiles are not listed");
        assert_eq!(listed[0].identifiers.len(), 2);
        assert_eq!(listed[0].merged_ids, vec![newer.profile.id.clone()]);
        assert_eq!(joined.profile.merged_ids, vec![newer.profile.id.clone()]);
    }
);

madtech_common::backend_tests!(
    unknown_profiles_are_not_found,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        assert!(matches!(
            store.get("nope").await,
            Err(ProfileError::NotFound)
        ));
        let missing = ids(&[("email", "nobody@example.com")])
            .into_iter()
            .next()
            .expect("one");
        assert!(matches!(
            store.find_by_identifier(&missing).await,
            Err(ProfileError::NotFound)
        ));
    }
);

madtech_common::backend_tests!(
    listing_pages_through_everyone,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        for i in 0..7 {
            store
                .upsert(upsert(&[("customer_id", &format!("C{i}"))], &[], "FR"))
                .await
                .expect("upsert");
        }
        let mut seen = Vec::new();
        let mut after = String::new();
        loop {
            let page = store.list_page(&after, 3).await.expect("page");
            let Some(last) = page.last() else { break };
            after = last.id.clone();
            seen.extend(page.into_iter().map(|p| p.id));
        }
        assert_eq!(seen.len(), 7);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
    }
);

madtech_common::backend_tests!(data_survives_reconnecting, |db: TestDatabase| async move {
    let id = {
        let store = store(&db).await;
        store
            .upsert(upsert(&[("email", "keep@example.com")], &[], "FR"))
            .await
            .expect("upsert")
            .profile
            .id
    };
    let store = store(&db).await;
    assert_eq!(store.get(&id).await.expect("still there").region, "FR");
});

madtech_common::backend_tests!(
    merge_chains_stay_one_hop_long,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let oldest = store
            .upsert(upsert(&[("email", "o@example.com")], &[], "FR"))
            .await
            .expect("o");
        let middle = store
            .upsert(upsert(&[("customer_id", "CA")], &[], ""))
            .await
            .expect("a");
        let newest = store
            .upsert(upsert(&[("cookie_id", "CB")], &[], ""))
            .await
            .expect("b");
        // newest into middle, then middle into oldest.
        store
            .upsert(upsert(
                &[("customer_id", "CA"), ("cookie_id", "CB")],
                &[],
                "",
            ))
            .await
            .expect("merge 1");
        let last = store
            .upsert(upsert(
                &[("email", "o@example.com"), ("customer_id", "CA")],
                &[],
                "",
            ))
            .await
            .expect("merge 2");
        assert_eq!(last.profile.id, oldest.profile.id);
        let mut expected = vec![middle.profile.id.clone(), newest.profile.id.clone()];
        expected.sort();
        assert_eq!(
            last.profile.merged_ids, expected,
            "the survivor knows every id merged into it"
        );
        assert_eq!(
            store.get(&newest.profile.id).await.expect("resolves").id,
            oldest.profile.id
        );
        assert_eq!(last.profile.identifiers.len(), 3);
    }
);

fn event(message_id: &str, name: &str, who: Who) -> NewEvent {
    NewEvent {
        message_id: message_id.into(),
        name: name.into(),
        occurred_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
        properties: BTreeMap::from([("amount".to_string(), TraitValue::Number(60.0))]),
        source: "web".into(),
        who,
    }
}

fn by(pairs: &[(&str, &str)]) -> Who {
    Who::Identifiers(ids(pairs))
}

async fn all_changes(store: &ProfileStore, after: u64) -> Vec<Change> {
    let mut cursor = after;
    let mut out = Vec::new();
    loop {
        let page = store.changes_after(cursor, 3).await.expect("changes");
        if page.read_to == cursor {
            return out;
        }
        cursor = page.read_to;
        out.extend(page.changes);
    }
}

fn events_in(changes: &[Change]) -> Vec<StoredEvent> {
    changes
        .iter()
        .filter_map(|c| match &c.kind {
            ChangeKind::EventsAppended(events) => Some(events.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

madtech_common::backend_tests!(
    trait_operations_keep_source_and_time,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let observed = chrono::DateTime::from_timestamp(1_600_000_000, 0).expect("time");
        let mut request = upsert(&[("email", "t@example.com")], &[], "FR");
        request.operations = vec![
            TraitOperation::Set("plan".into(), TraitValue::String("free".into())),
            TraitOperation::Increment("visits".into(), 2.0),
            TraitOperation::SetOnce("first".into(), TraitValue::Bool(true)),
        ];
        request.source = "crm".into();
        request.observed_at = Some(observed);
        store.upsert(request.clone()).await.expect("first");
        request.operations = vec![
            TraitOperation::Increment("visits".into(), 3.0),
            TraitOperation::SetOnce("first".into(), TraitValue::Bool(false)),
            TraitOperation::Unset("plan".into()),
        ];
        let done = store.upsert(request.clone()).await.expect("second");
        assert_eq!(value(&done.profile, "visits"), TraitValue::Number(5.0));
        assert_eq!(value(&done.profile, "first"), TraitValue::Bool(true));
        assert!(!done.profile.traits.contains_key("plan"));
        assert_eq!(done.profile.traits["visits"].source, "crm");
        assert_eq!(done.profile.traits["visits"].observed_at, observed);

        // Incrementing a string changes nothing and says why.
        request.operations = vec![
            TraitOperation::Set("visits".into(), TraitValue::Number(100.0)),
            TraitOperation::Set("first".into(), TraitValue::String("x".into())),
            TraitOperation::Increment("first".into(), 1.0),
        ];
        let err = store.upsert(request).await.expect_err("not a number");
        assert!(matches!(err, ProfileError::Precondition(_)), "{err}");
        let after = store.get(&done.profile.id).await.expect("get");
        assert_eq!(
            value(&after, "visits"),
            TraitValue::Number(5.0),
            "rolled back"
        );
    }
);

madtech_common::backend_tests!(
    refused_merges_and_blocked_values_are_recorded,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let parent = store
            .upsert(upsert(
                &[("customer_id", "C1"), ("cookie_id", "tablet")],
                &[],
                "FR",
            ))
            .await
            .expect("parent");
        // The child logs in on the family tablet.
        let child = store
            .upsert(upsert(
                &[("customer_id", "C2"), ("cookie_id", "tablet")],
                &[],
                "FR",
            ))
            .await
            .expect("child");
        assert!(child.created, "a second person, not a merge");
        assert_ne!(child.profile.id, parent.profile.id);
        assert!(child.merged.is_empty());
        assert_eq!(child.kept_apart.len(), 1);
        assert_eq!(child.kept_apart[0].rule, "limit customer_id 1");
        assert_eq!(
            child.kept_apart[0].owner.as_deref(),
            Some(parent.profile.id.as_str())
        );
        assert_eq!(
            store
                .find_by_identifier(&ids(&[("cookie_id", "tablet")]).pop_first().expect("one"))
                .await
                .expect("cookie")
                .id,
            parent.profile.id,
            "the cookie stays where it was"
        );
        let export = store
            .export(&Lookup::ProfileId(child.profile.id.clone()))
            .await
            .expect("export");
        assert_eq!(
            export["identity_conflicts"][0]["rule"],
            "limit customer_id 1"
        );

        let blocked = store
            .upsert(upsert(&[("email", "TEST@example.com")], &[], ""))
            .await
            .expect_err("only a blocked identifier");
        assert!(
            matches!(blocked, ProfileError::Precondition(_)),
            "{blocked}"
        );
        let with_blocked = store
            .upsert(upsert(
                &[("email", "test@example.com"), ("customer_id", "C1")],
                &[],
                "",
            ))
            .await
            .expect("blocked one is dropped");
        assert_eq!(with_blocked.profile.id, parent.profile.id);
        assert_eq!(with_blocked.kept_apart[0].rule, "blocked");
        assert_eq!(with_blocked.profile.identifiers.len(), 2);
    }
);

madtech_common::backend_tests!(
    events_are_idempotent_and_resolve_people,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let known = store
            .upsert(upsert(&[("customer_id", "K1")], &[], "FR"))
            .await
            .expect("known");
        let batch = vec![
            event("m1", "purchase", by(&[("customer_id", "K1")])),
            event("m2", "view", Who::ProfileId(known.profile.id.clone())),
            event("m3", "signup", by(&[("email", "new@example.com")])),
            // Links the new person's email to a cookie seen in the batch.
            event(
                "m4",
                "view",
                by(&[("email", "new@example.com"), ("cookie_id", "ck")]),
            ),
            event("m1", "purchase", by(&[("customer_id", "K1")])),
        ];
        let first = store.ingest(batch.clone()).await.expect("ingest");
        assert_eq!(
            (first.accepted, first.duplicates),
            (4, 1),
            "m1 twice in one batch"
        );
        assert_eq!(
            first.profile_ids[0].as_deref(),
            Some(known.profile.id.as_str())
        );
        assert_eq!(first.profile_ids[2], first.profile_ids[3]);
        assert_eq!(first.profile_ids[4], None);

        let retry = store.ingest(batch.clone()).await.expect("retry");
        assert_eq!(
            (retry.accepted, retry.duplicates),
            (0, 5),
            "a retried batch changes nothing"
        );

        let newcomer = store
            .find_by_identifier(&ids(&[("cookie_id", "ck")]).pop_first().expect("one"))
            .await
            .expect("created by events");
        assert_eq!(newcomer.identifiers.len(), 2);

        let unknown = store
            .ingest(vec![
                event("m9", "view", by(&[("customer_id", "K1")])),
                event("m10", "view", Who::ProfileId("nobody".into())),
            ])
            .await
            .expect_err("unknown profile");
        assert!(
            matches!(unknown, ProfileError::UnknownReference(ref f) if f == "events[1].profile_id")
        );
        let changes = all_changes(&store, 0).await;
        assert_eq!(
            events_in(&changes).len(),
            4,
            "the refused batch wrote nothing"
        );
    }
);

madtech_common::backend_tests!(
    events_follow_their_person_through_merges,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let a = store
            .upsert(upsert(&[("email", "a@example.com")], &[], "FR"))
            .await
            .expect("a");
        let b = store
            .upsert(upsert(&[("cookie_id", "kb")], &[], ""))
            .await
            .expect("b");
        store
            .ingest(vec![
                event("e1", "view", Who::ProfileId(b.profile.id.clone())),
                // This event merges b into a; e1, before it, follows.
                event(
                    "e2",
                    "login",
                    by(&[("email", "a@example.com"), ("cookie_id", "kb")]),
                ),
                event("e3", "view", Who::ProfileId(b.profile.id.clone())),
            ])
            .await
            .expect("ingest");
        let export = store
            .export(&Lookup::ProfileId(b.profile.id.clone()))
            .await
            .expect("export via the merged id");
        assert_eq!(export["profile_id"], a.profile.id.as_str());
        assert_eq!(export["events"].as_array().expect("events").len(), 3);
        assert_eq!(
            export["merges"][0]["merged_profile_id"],
            b.profile.id.as_str()
        );
        assert_eq!(export["merges"][0]["linked_by"], "cookie_id:kb");
        let changes = all_changes(&store, 0).await;
        assert!(
            events_in(&changes)
                .iter()
                .all(|e| e.profile_id == a.profile.id)
        );
        assert!(changes.iter().any(|c| matches!(&c.kind,
            ChangeKind::Merged { survivor, merged } if *survivor == a.profile.id && merged == &vec![b.profile.id.clone()])));
    }
);

madtech_common::backend_tests!(
    the_change_stream_is_ordered_and_resumes_after_reconnecting,
    |db: TestDatabase| async move {
        let cursor = {
            let store = store(&db).await;
            let p = store
                .upsert(upsert(&[("email", "w@example.com")], &[], "FR"))
                .await
                .expect("p");
            store
                .ingest(vec![event(
                    "w1",
                    "view",
                    Who::ProfileId(p.profile.id.clone()),
                )])
                .await
                .expect("ingest");
            let changes = all_changes(&store, 0).await;
            assert_eq!(changes.len(), 2);
            assert!(matches!(
                &changes[0].kind,
                ChangeKind::Upserted { created: true, .. }
            ));
            assert!(changes[0].cursor < changes[1].cursor);
            changes[1].cursor
        };
        let store = store(&db).await;
        store
            .upsert(upsert(
                &[("email", "w@example.com")],
                &[("x", TraitValue::Bool(true))],
                "",
            ))
            .await
            .expect("update");
        let resumed = all_changes(&store, cursor).await;
        assert_eq!(resumed.len(), 1, "exactly what came after the cursor");
        let ChangeKind::Upserted { profile, created } = &resumed[0].kind else {
            panic!("expected an upsert, got {:?}", resumed[0].kind);
        };
        assert!(!created);
        assert_eq!(profile.traits["x"].value, TraitValue::Bool(true));
    }
);

madtech_common::backend_tests!(
    erasure_removes_the_person_everywhere_and_is_published,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let keep = store
            .upsert(upsert(&[("email", "keep@example.com")], &[], "FR"))
            .await
            .expect("keep");
        let gone = store
            .upsert(upsert(&[("email", "gone@example.com")], &[], "FR"))
            .await
            .expect("gone");
        let alias = store
            .upsert(upsert(&[("cookie_id", "gone-cookie")], &[], ""))
            .await
            .expect("alias");
        // Recorded under the id about to be merged away, and filed under it.
        store
            .ingest(vec![event(
                "a1",
                "view",
                Who::ProfileId(alias.profile.id.clone()),
            )])
            .await
            .expect("alias event");
        store
            .upsert(upsert(
                &[("email", "gone@example.com"), ("cookie_id", "gone-cookie")],
                &[],
                "",
            ))
            .await
            .expect("merge");
        store
            .ingest(vec![
                event("g1", "view", by(&[("email", "gone@example.com")])),
                event("k1", "view", by(&[("email", "keep@example.com")])),
            ])
            .await
            .expect("events");
        let before = all_changes(&store, 0).await.last().expect("changes").cursor;

        let erased = store
            .erase(
                &Lookup::Identifier(
                    ids(&[("cookie_id", "gone-cookie")])
                        .pop_first()
                        .expect("one"),
                ),
                false,
            )
            .await
            .expect("erase");
        let mut expected = vec![gone.profile.id.clone(), alias.profile.id.clone()];
        expected.sort();
        let mut got = erased.profile_ids.clone();
        got.sort();
        assert_eq!(got, expected);
        assert_eq!((erased.identifiers, erased.events), (2, 2));

        assert!(matches!(
            store.get(&gone.profile.id).await,
            Err(ProfileError::NotFound)
        ));
        assert!(matches!(
            store.get(&alias.profile.id).await,
            Err(ProfileError::NotFound)
        ));
        assert_eq!(
            store
                .get(&keep.profile.id)
                .await
                .expect("untouched")
                .identifiers
                .len(),
            1
        );

        // Nothing about the person is left in the change log but the erasure.
        let changes = all_changes(&store, 0).await;
        let text = format!("{changes:?}");
        assert!(
            !text.contains("gone@example.com") && !text.contains("gone-cookie"),
            "{text}"
        );
        assert_eq!(events_in(&changes).len(), 1);
        let last = changes.last().expect("erasure");
        assert!(last.cursor > before, "cursors are never reused");
        assert!(matches!(&last.kind, ChangeKind::Erased { profile_ids } if profile_ids.len() == 2));

        // A cursor taken before the erasure still resumes, and new writes get
        // new cursors.
        let again = store
            .upsert(upsert(&[("email", "gone@example.com")], &[], ""))
            .await
            .expect("new");
        assert!(again.created, "an erased person comes back as someone new");
        let tail = all_changes(&store, last.cursor).await;
        assert_eq!(tail.len(), 1);
    }
);

madtech_common::backend_tests!(identifiers_can_be_removed, |db: TestDatabase| async move {
    let store = store(&db).await;
    let p = store
        .upsert(upsert(
            &[("email", "r@example.com"), ("cookie_id", "rc")],
            &[],
            "FR",
        ))
        .await
        .expect("p");
    let cookie = ids(&[("cookie_id", "rc")]).pop_first().expect("one");
    let after = store.remove_identifier(&cookie).await.expect("remove");
    assert_eq!(after.id, p.profile.id);
    assert_eq!(after.identifiers.len(), 1);
    assert!(matches!(
        store.find_by_identifier(&cookie).await,
        Err(ProfileError::NotFound)
    ));
    assert!(matches!(
        store.remove_identifier(&cookie).await,
        Err(ProfileError::NotFound)
    ));
    // The cookie seen again makes a new person; it is no longer linked.
    let next = store
        .upsert(upsert(&[("cookie_id", "rc")], &[], ""))
        .await
        .expect("new");
    assert!(next.created);
});

madtech_common::backend_tests!(
    large_batches_span_several_changes,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let p = store
            .upsert(upsert(&[("customer_id", "big")], &[], "FR"))
            .await
            .expect("p");
        let batch: Vec<NewEvent> = (0..2_500)
            .map(|i| {
                event(
                    &format!("b{i}"),
                    "view",
                    Who::ProfileId(p.profile.id.clone()),
                )
            })
            .collect();
        let done = store.ingest(batch.clone()).await.expect("ingest");
        assert_eq!(done.accepted, 2_500);
        let changes = all_changes(&store, 0).await;
        let batches: Vec<usize> = changes
            .iter()
            .filter_map(|c| match &c.kind {
                ChangeKind::EventsAppended(e) => Some(e.len()),
                _ => None,
            })
            .collect();
        assert_eq!(batches, vec![1_000, 1_000, 500]);
    }
);

madtech_common::backend_tests!(
    a_persons_events_are_found_in_every_block,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let a = store
            .upsert(upsert(&[("customer_id", "a")], &[], "FR"))
            .await
            .expect("a");
        let b = store
            .upsert(upsert(&[("customer_id", "b")], &[], "FR"))
            .await
            .expect("b");
        // Alternating people over more than two blocks of ids.
        let per_person = usize::try_from(events::EVENTS_PER_BLOCK).expect("small") + 500;
        let all: Vec<NewEvent> = (0..2 * per_person)
            .map(|i| {
                let who = if i % 2 == 0 { &a } else { &b };
                event(
                    &format!("m{i}"),
                    "view",
                    Who::ProfileId(who.profile.id.clone()),
                )
            })
            .collect();
        for batch in all.chunks(1_000) {
            store.ingest(batch.to_vec()).await.expect("ingest");
        }
        let count = |export: serde_json::Value| export["events"].as_array().map(Vec::len);
        let lookup_a = Lookup::ProfileId(a.profile.id.clone());
        let lookup_b = Lookup::ProfileId(b.profile.id.clone());
        assert_eq!(
            count(store.export(&lookup_a).await.expect("a")),
            Some(per_person)
        );
        let erased = store.erase(&lookup_a, false).await.expect("erase a");
        assert_eq!(erased.events, per_person as u64);
        assert_eq!(
            count(store.export(&lookup_b).await.expect("b")),
            Some(per_person)
        );
    }
);

madtech_common::backend_tests!(
    batch_upserts_apply_all_or_nothing,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let done = store
            .upsert_many(vec![
                upsert(&[("email", "b1@example.com")], &[], "FR"),
                upsert(&[("email", "b2@example.com")], &[], "DE"),
                // Links the first two: a merge inside the batch.
                upsert(
                    &[("email", "b1@example.com"), ("email", "b2@example.com")],
                    &[],
                    "",
                ),
            ])
            .await
            .expect("batch");
        assert_eq!(done.len(), 3);
        assert_eq!(done[2].merged, vec![done[1].profile.id.clone()]);

        let mut failing = upsert(&[("email", "b3@example.com")], &[], "");
        failing.operations = vec![
            TraitOperation::Set("s".into(), TraitValue::String("x".into())),
            TraitOperation::Increment("s".into(), 1.0),
        ];
        let err = store
            .upsert_many(vec![
                upsert(&[("email", "b4@example.com")], &[], ""),
                failing,
            ])
            .await
            .expect_err("second fails");
        assert!(err.to_string().starts_with("upserts[1]:"), "{err}");
        let b4 = ids(&[("email", "b4@example.com")])
            .pop_first()
            .expect("one");
        assert!(
            matches!(
                store.find_by_identifier(&b4).await,
                Err(ProfileError::NotFound)
            ),
            "the first upsert was rolled back"
        );
    }
);

madtech_common::backend_tests!(
    concurrent_batches_commit_together_without_touching_each_other,
    |db: TestDatabase| async move {
        let store = std::sync::Arc::new(store(&db).await);
        let p = store
            .upsert(upsert(&[("customer_id", "group")], &[], "FR"))
            .await
            .expect("p");
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = std::sync::Arc::clone(&store);
            let id = p.profile.id.clone();
            tasks.push(tokio::spawn(async move {
                let who = if t == 3 {
                    Who::ProfileId("nobody".into())
                } else {
                    Who::ProfileId(id)
                };
                let batch: Vec<NewEvent> = (0..50)
                    .map(|e| event(&format!("g{t}-{e}"), "view", who.clone()))
                    .collect();
                store.ingest(batch).await
            }));
        }
        let mut accepted = 0;
        for (t, task) in tasks.into_iter().enumerate() {
            match task.await.expect("task") {
                Ok(done) => accepted += done.accepted,
                Err(ProfileError::UnknownReference(_)) if t == 3 => {}
                Err(err) => panic!("batch {t}: {err}"),
            }
        }
        assert_eq!(accepted, 7 * 50, "one bad batch fails alone");
        let export = store
            .export(&Lookup::ProfileId(p.profile.id.clone()))
            .await
            .expect("export");
        assert_eq!(export["events"].as_array().expect("events").len(), 7 * 50);
        let changes = all_changes(&store, 0).await;
        assert_eq!(events_in(&changes).len(), 7 * 50, "published once each");
    }
);

madtech_common::backend_tests!(
    a_suppressed_identifier_cannot_bring_an_erased_person_back_until_lifted,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let ann = store
            .upsert(upsert(
                &[("email", "ann@example.com"), ("customer_id", "C-1")],
                &[],
                "FR",
            ))
            .await
            .expect("ann");
        store
            .erase(&Lookup::ProfileId(ann.profile.id.clone()), true)
            .await
            .expect("erase with suppression");

        for pairs in [
            vec![("email", " Ann@Example.com ")],
            vec![("customer_id", "C-1"), ("email", "new@example.com")],
        ] {
            let refused = store
                .upsert(upsert(&pairs, &[], "FR"))
                .await
                .expect_err("suppressed");
            match refused {
                ProfileError::Precondition(reason) => {
                    assert!(reason.contains("erased at their request"), "{reason}");
                    assert!(
                        !reason.contains("ann@example.com"),
                        "no value in the reason"
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let refused = store
            .ingest(vec![event(
                "e1",
                "view",
                by(&[("email", "ann@example.com")]),
            )])
            .await
            .expect_err("events cannot bring her back either");
        assert!(
            matches!(refused, ProfileError::Precondition(_)),
            "{refused:?}"
        );
        store
            .upsert(upsert(&[("email", "new@example.com")], &[], "FR"))
            .await
            .expect("someone else is fine");

        let email = ids(&[("email", "ann@example.com")])
            .pop_first()
            .expect("one");
        assert!(store.lift_suppression(&email).await.expect("lift"));
        assert!(
            !store.lift_suppression(&email).await.expect("again"),
            "once"
        );
        store
            .upsert(upsert(&[("email", "ann@example.com")], &[], "FR"))
            .await
            .expect("back with new consent");
        // Lifted and let back in one write.
        let (lifted, back) = store
            .lift_and_upsert(upsert(&[("email", "ann@example.com")], &[], "FR"))
            .await
            .expect("lift and upsert");
        assert!(!lifted, "nothing left to lift");
        assert!(!back.created, "she is back already");
        let still = store
            .upsert(upsert(&[("customer_id", "C-1")], &[], "FR"))
            .await
            .expect_err("only the lifted identifier is free");
        assert!(matches!(still, ProfileError::Precondition(_)));
        let (lifted, joined) = store
            .lift_and_upsert(upsert(
                &[("email", "ann@example.com"), ("customer_id", "C-1")],
                &[],
                "FR",
            ))
            .await
            .expect("lift and upsert");
        assert!(lifted, "C-1 was suppressed");
        assert_eq!(joined.profile.id, back.profile.id, "C-1 joins her");
    }
);

madtech_common::backend_tests!(
    lookups_made_before_an_erasure_are_not_used,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        let gone = store
            .upsert(upsert(&[("customer_id", "E1")], &[], "FR"))
            .await
            .expect("person");
        let batch = vec![event("late-1", "view", by(&[("customer_id", "E1")]))];
        let early = events::look_up(&store.db, &batch).await.expect("look up");
        store
            .erase(&Lookup::ProfileId(gone.profile.id.clone()), false)
            .await
            .expect("erase");

        let done = store.ingest_looked_up(batch, early).await.expect("ingest");
        let owner = done.profile_ids[0].clone().expect("accepted");
        assert_ne!(
            owner, gone.profile.id,
            "nothing may be recorded for an erased person"
        );
        let now = store
            .find(&Lookup::Identifier(
                ids(&[("customer_id", "E1")]).pop_first().expect("id"),
            ))
            .await
            .expect("the identifier's new owner");
        assert_eq!(now.id, owner);
    }
);

madtech_common::backend_tests!(
    lookups_made_before_another_append_still_refuse_its_duplicates,
    |db: TestDatabase| async move {
        let store = store(&db).await;
        store
            .upsert(upsert(&[("customer_id", "D1")], &[], "FR"))
            .await
            .expect("person");
        let batch = vec![
            event("dup-1", "view", by(&[("customer_id", "D1")])),
            event("dup-2", "view", by(&[("customer_id", "D1")])),
        ];
        let early = events::look_up(&store.db, &batch).await.expect("look up");
        // The same batch (a client's retry) lands first.
        let first = store.ingest(batch.clone()).await.expect("first");
        assert_eq!(first.accepted, 2);

        let retry = store.ingest_looked_up(batch, early).await.expect("retry");
        assert_eq!(
            (retry.accepted, retry.duplicates),
            (0, 2),
            "the unique index refuses the stale lookups' insert and the retry looks again"
        );
        let appended = all_changes(&store, 0)
            .await
            .into_iter()
            .filter_map(|change| match change.kind {
                ChangeKind::EventsAppended(events) => Some(events.len()),
                _ => None,
            })
            .sum::<usize>();
        assert_eq!(appended, 2, "each event once on the change stream");
    }
);
