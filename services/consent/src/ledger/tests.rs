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

fn choice(purpose: &str, state: impl Into<State>) -> RecordedChoice {
    RecordedChoice {
        purpose: purpose.into(),
        state: state.into(),
        legal_basis: LegalBasis::Consent,
        signal: None,
        derived_from: "explicit choice".into(),
        conflict: None,
        lifetime_micros: None,
        holds: Vec::new(),
    }
}

fn record(profile: &str, choices: &[(&str, Choice)]) -> Record {
    Record {
        profile_id: profile.into(),
        choices: choices.iter().map(|(p, c)| choice(p, *c)).collect(),
        source: Source::Cmp,
        region: "FR".into(),
        notice_version: "2026-01".into(),
        cmp: None,
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
        assert_eq!(after[0].state, State::Denied);
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

madtech_common::backend_tests!(
    an_expired_choice_reads_as_unset_with_its_cursor,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        let day = 86_400_000_000;
        let now = Utc::now().timestamp_micros();
        let mut old = record("p", &[("ad_targeting", Choice::Granted)]);
        old.collected_at_micros = Some(now - 400 * day);
        old.choices[0].lifetime_micros = Some(395 * day);
        let mut fresh = record("q", &[("ad_targeting", Choice::Granted)]);
        fresh.collected_at_micros = Some(now - day);
        fresh.choices[0].lifetime_micros = Some(395 * day);
        let old_cursor = ledger.record(old).await.expect("old")[0].cursor;
        ledger.record(fresh).await.expect("fresh");

        let answer = ledger
            .current(&["p".into(), "q".into()], &["ad_targeting".into()])
            .await
            .expect("current");
        let p = &answer[0].1[0];
        assert_eq!(p.state, State::Unset, "395 days have passed");
        assert_eq!(p.cursor, old_cursor, "the expired entry is named");
        assert_eq!(p.expires_at_micros, Some(now - 5 * day));
        assert_eq!(answer[1].1[0].state, State::Granted);
    }
);

madtech_common::backend_tests!(
    a_reask_hold_refuses_a_grant_after_a_recent_denial_and_writes_nothing,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        let day = 86_400_000_000;
        let now = Utc::now().timestamp_micros();
        let mut denial = record("p", &[("data_sale", Choice::Denied)]);
        denial.collected_at_micros = Some(now - 30 * day);
        ledger.record(denial).await.expect("opt-out");
        let head = ledger.head().await.expect("head");

        let mut ask_again = record(
            "p",
            &[
                ("analytics", Choice::Granted),
                ("data_sale", Choice::Granted),
            ],
        );
        ask_again.collected_at_micros = None;
        ask_again.choices[1].holds = vec![ReaskHold {
            rule: "ccpa_twelve_months".into(),
            wait_micros: 365 * day,
        }];
        let err = ledger
            .record(ask_again.clone())
            .await
            .expect_err("too soon");
        match err {
            ConsentError::ReaskTooSoon {
                purpose,
                rule,
                until_micros,
            } => {
                assert_eq!(purpose, "data_sale");
                assert_eq!(rule, "ccpa_twelve_months");
                assert_eq!(until_micros, now - 30 * day + 365 * day);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(ledger.head().await.expect("head"), head, "nothing written");

        // Without the hold (the person asked themselves) it goes through.
        ask_again.choices[1].holds.clear();
        ledger.record(ask_again).await.expect("person-initiated");
        let current = ledger.current(&["p".into()], &[]).await.expect("current");
        assert!(current[0].1.iter().all(|s| s.state == State::Granted));
    }
);

madtech_common::backend_tests!(
    history_proves_each_choice_with_its_evidence,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        let mut from_signal = record("p", &[("ad_targeting", Choice::Denied)]);
        from_signal.cmp = Some((300, 7));
        from_signal.choices[0].signal = Some(SignalEvidence {
            kind: "usp".into(),
            raw: "1YYN".into(),
        });
        from_signal.choices[0].legal_basis = LegalBasis::OptOut;
        from_signal.choices[0].derived_from = "usp opt_out_sale=Y".into();
        from_signal.choices[0].conflict = Some("granted (explicit choice) overridden".into());
        ledger.record(from_signal).await.expect("signal");
        ledger
            .record(record("other", &[("analytics", Choice::Granted)]))
            .await
            .expect("someone else");
        ledger
            .record(record("p", &[("analytics", Choice::Granted)]))
            .await
            .expect("explicit");

        let history = ledger.history("p", 0, 10).await.expect("history");
        assert_eq!(history.len(), 2, "only this person's entries");
        let first = &history[0];
        assert_eq!(first.state, State::Denied);
        assert_eq!(first.legal_basis, LegalBasis::OptOut);
        assert_eq!(first.cmp, Some((300, 7)));
        assert_eq!(
            first.signal,
            Some(SignalEvidence {
                kind: "usp".into(),
                raw: "1YYN".into()
            })
        );
        assert_eq!(first.derived_from, "usp opt_out_sale=Y");
        assert!(first.conflict.is_some());
        assert_eq!(history[1].signal, None);
        let rest = ledger
            .history("p", first.cursor, 10)
            .await
            .expect("next page");
        assert_eq!(rest, history[1..].to_vec());
    }
);

async fn states(ledger: &Ledger, person: &str) -> Vec<(String, State)> {
    let current = ledger
        .current(&[person.into()], &[])
        .await
        .expect("current");
    current[0]
        .1
        .iter()
        .map(|s| (s.purpose.clone(), s.state))
        .collect()
}

madtech_common::backend_tests!(
    a_merge_takes_the_most_restrictive_state_once_until_the_person_chooses_again,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        ledger
            .record(record(
                "keep",
                &[
                    ("ad_targeting", Choice::Granted),
                    ("analytics", Choice::Granted),
                ],
            ))
            .await
            .expect("survivor");
        ledger
            .record(record(
                "gone",
                &[
                    ("ad_targeting", Choice::Denied),
                    ("email_marketing", Choice::Granted),
                ],
            ))
            .await
            .expect("absorbed");

        let written = ledger
            .apply_merge(41, "keep", &["gone".into()])
            .await
            .expect("merge");
        assert_eq!(written.len(), 2, "{written:?}");
        assert!(written.iter().all(|e| e.source == Source::Merge));
        assert!(
            written[0].derived_from.contains("gone denied"),
            "{}",
            written[0].derived_from
        );
        assert_eq!(
            states(&ledger, "keep").await,
            vec![
                ("ad_targeting".into(), State::Denied),
                ("analytics".into(), State::Unset),
            ],
            "denied beats granted; unset (gone never agreed) beats granted; \
             gone's email grant does not come with the merge"
        );
        assert_eq!(ledger.profile_cursor().await.expect("cursor"), 41);

        let head = ledger.head().await.expect("head");
        let again = ledger
            .apply_merge(41, "keep", &["gone".into()])
            .await
            .expect("replayed");
        assert!(again.is_empty(), "a merge is applied once");
        assert_eq!(ledger.head().await.expect("head"), head);

        // The person chooses again, through either id: the survivor records
        // it and the merged-away id gets a copy.
        let mut again = record("gone", &[("ad_targeting", Choice::Granted)]);
        again.collected_at_micros = None;
        let chosen = ledger.record(again).await.expect("chooses again");
        let mut subjects: Vec<&str> = chosen.iter().map(|e| e.profile_id.as_str()).collect();
        subjects.sort_unstable();
        assert_eq!(subjects, vec!["gone", "keep"]);
        for person in ["keep", "gone"] {
            let now = states(&ledger, person).await;
            assert!(
                now.contains(&("ad_targeting".into(), State::Granted)),
                "{person}: {now:?}"
            );
        }
    }
);

madtech_common::backend_tests!(
    merges_chain_and_bring_no_grant_the_survivor_did_not_give,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        ledger
            .record(record("c", &[("personalization", Choice::Granted)]))
            .await
            .expect("c");
        ledger
            .apply_merge(5, "b", &["c".into()])
            .await
            .expect("c into b");
        assert_eq!(
            states(&ledger, "b").await,
            Vec::<(String, State)>::new(),
            "b had no choice: c's grant is not b's"
        );
        ledger
            .record(record("b", &[("personalization", Choice::Granted)]))
            .await
            .expect("b chooses");
        ledger
            .apply_merge(9, "a", &["b".into()])
            .await
            .expect("b into a");
        assert_eq!(
            states(&ledger, "a").await,
            Vec::<(String, State)>::new(),
            "a never agreed, and b's grant does not become a's"
        );
        // c followed b into a: a choice for a reaches both.
        let chosen = ledger
            .record(record("a", &[("personalization", Choice::Denied)]))
            .await
            .expect("a chooses");
        let mut subjects: Vec<&str> = chosen.iter().map(|e| e.profile_id.as_str()).collect();
        subjects.sort_unstable();
        assert_eq!(subjects, vec!["a", "b", "c"]);
        ledger
            .advance_profile_cursor(7)
            .await
            .expect("older cursor");
        assert_eq!(
            ledger.profile_cursor().await.expect("cursor"),
            9,
            "never back"
        );
    }
);

madtech_common::backend_tests!(
    a_choice_collected_after_the_merged_choices_counts_though_recorded_after_the_merge,
    |db: TestDatabase| async move {
        let ledger = ledger(&db).await;
        ledger
            .record(record("keep", &[("ad_targeting", Choice::Granted)]))
            .await
            .expect("survivor");
        ledger
            .apply_merge(3, "keep", &["gone".into()])
            .await
            .expect("merge");
        assert_eq!(
            states(&ledger, "keep").await,
            vec![("ad_targeting".into(), State::Unset)],
            "gone never agreed"
        );
        // A denial made after keep's grant, which reaches the ledger only
        // after the merge (a delayed CMP upload): the person's newest choice.
        let mut late = record("keep", &[("ad_targeting", Choice::Denied)]);
        late.collected_at_micros = Some(1_700_000_000_000_001);
        let written = ledger.record(late).await.expect("late denial");
        assert!(written[0].effective, "{written:?}");
        assert_eq!(
            states(&ledger, "keep").await,
            vec![("ad_targeting".into(), State::Denied)]
        );
    }
);
