use super::*;
use crate::identity::Normaliser;
use crate::traits::TraitValue;
use madtech_common::db::connect_and_migrate;
use madtech_common::testing::TestDatabase;

async fn store(db: &TestDatabase) -> ProfileStore {
    let conn = connect_and_migrate::<Migrator>(&db.config)
        .await
        .expect("connect");
    ProfileStore::new(conn)
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
        traits: traits
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        region: region.into(),
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
            joined.profile.traits["tier"],
            TraitValue::String("gold".into()),
            "survivor keeps its values"
        );
        assert_eq!(
            joined.profile.traits["age"],
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
