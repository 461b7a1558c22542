use super::*;
use madtech_common::db::connect_and_migrate;
use madtech_common::testing::TestDatabase;

async fn ledger(db: &TestDatabase) -> Ledger {
    Ledger::new(
        connect_and_migrate::<Migrator>(&db.config)
            .await
            .expect("connect"),
    )
}

fn record(profile: &str, choices: &[(&str, Choice)]) -> Record {
    Record {
        profile_id: profile.into(),
        choices: choices.iter().map(|(p, c)| (p.to_string(), *c)).collect(),
        source: Source::Cmp,
        region: "FR".into(),
        notice_version: "2026-01".into(),
        collected_at_micros: Some(1_700_000_000_000_000),
    }
}

madtech_common::backend_tests!(
    latest_entry_wins_and_history_is_kept,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        ledger
            .record(record(
                "p1",
                &[
                    ("ad_targeting", Choice::Granted),
                    ("analytics", Choice::Denied),
                ],
            ))
            .await
            .expect("first");
        ledger
            .record(record("p1", &[("ad_targeting", Choice::Denied)]))
            .await
            .expect("withdraw");

        let current = ledger.current(&["p1".into()], &[]).await.expect("current");
        let states: Vec<(String, State)> = current[0]
            .1
            .iter()
            .map(|s| (s.purpose.clone(), s.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("ad_targeting".into(), State::Denied),
                ("analytics".into(), State::Denied)
            ]
        );

        let history = ledger.entries_after(0, 100).await.expect("history");
        assert_eq!(history.len(), 3, "nothing is overwritten");
        assert!(history.windows(2).all(|w| w[0].cursor < w[1].cursor));
        assert_eq!(history[0].collected_at_micros, 1_700_000_000_000_000);
        assert_eq!(history[0].notice_version, "2026-01");
    }
);

madtech_common::backend_tests!(
    batch_reads_answer_unset_and_keep_order,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        ledger
            .record(record("b", &[("ad_targeting", Choice::Granted)]))
            .await
            .expect("b");
        let answer = ledger
            .current(&["a".into(), "b".into()], &["ad_targeting".into()])
            .await
            .expect("batch");
        assert_eq!(answer[0].0, "a");
        assert_eq!(answer[0].1[0].state, State::Unset);
        assert_eq!(answer[0].1[0].cursor, 0);
        assert_eq!(answer[1].0, "b");
        assert_eq!(answer[1].1[0].state, State::Granted);
    }
);

madtech_common::backend_tests!(
    cursors_resume_after_a_restart,
    |db: TestDatabase| async move {
        let first_cursor = {
            let ledger = ledger(&db).await;
            let written = ledger
                .record(record("p", &[("analytics", Choice::Granted)]))
                .await
                .expect("write");
            written[0].cursor
        };
        let ledger = ledger(&db).await;
        assert_eq!(ledger.head().await.expect("head"), first_cursor);
        ledger
            .record(record("p", &[("analytics", Choice::Denied)]))
            .await
            .expect("write");
        let after = ledger
            .entries_after(first_cursor, 10)
            .await
            .expect("resume");
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].choice, Choice::Denied);
        assert!(after[0].cursor > first_cursor);
        assert_eq!(ledger.head().await.expect("head"), after[0].cursor);
    }
);

madtech_common::backend_tests!(appends_wake_subscribers, |db: TestDatabase| async move {
    let ledger = ledger(&db).await;
    assert_eq!(ledger.head().await.expect("empty head"), 0);
    let mut watcher = ledger.subscribe();
    watcher.borrow_and_update();
    let written = ledger
        .record(record("p", &[("analytics", Choice::Granted)]))
        .await
        .expect("write");
    watcher.changed().await.expect("woken");
    assert_eq!(*watcher.borrow(), written[0].cursor);
});

madtech_common::backend_tests!(
    a_late_old_choice_does_not_override_a_newer_one,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        let at = |micros: i64, choice: Choice| Record {
            collected_at_micros: Some(micros),
            source: Source::Import,
            ..record("p", &[("ad_targeting", choice)])
        };
        ledger
            .record(at(2_000, Choice::Denied))
            .await
            .expect("today's denial");
        ledger
            .record(at(1_000, Choice::Granted))
            .await
            .expect("last year's grant, imported late");
        let current = ledger
            .current(&["p".into()], &["ad_targeting".into()])
            .await
            .expect("current");
        assert_eq!(current[0].1[0].state, State::Denied);
        let evidence = ledger.entries_after(0, 10).await.expect("ledger");
        assert_eq!(evidence.len(), 2, "both are evidence");
        assert_eq!(
            evidence.iter().map(|e| e.effective).collect::<Vec<_>>(),
            vec![true, false],
            "watchers learn the late grant changed nothing"
        );
        ledger
            .record(at(3_000, Choice::Granted))
            .await
            .expect("a new grant");
        let current = ledger
            .current(&["p".into()], &["ad_targeting".into()])
            .await
            .expect("current");
        assert_eq!(current[0].1[0].state, State::Granted);
    }
);
