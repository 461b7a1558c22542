//! The segments service's own copy of what rules need, kept from the
//! profiles change stream (it never reads the profiles database): people
//! (region, identifiers, merged ids), typed traits, and events with typed
//! properties. Each page of changes is applied in one transaction with the
//! cursor it ends at, so a restart resumes exactly after it.

use madtech_common::db::settle;
use std::collections::BTreeMap;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, TransactionTrait,
};

use super::WriteLock;
use super::membership;
use super::sql::{
    Compiler, JsonFunctions, MAX_BINDS, Sql, execute, insert_rows, json_page, number,
};
use super::statistics::Statistics;

fn now() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
use crate::error::SegmentError;
use crate::rules::eval::{Person, PersonEvent, Stored};
use crate::rules::{Rule, Value};

/// A change from the profiles stream, as the projection needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A person's current state (created or changed).
    Upserted(Snapshot),
    Merged {
        survivor: String,
        merged: Vec<String>,
    },
    Erased {
        profile_ids: Vec<String>,
    },
    Events(Vec<NewEvent>),
}

impl Change {
    /// The people whose segment memberships this change may alter (erased
    /// and merged-away people leave by themselves).
    pub fn touched(&self) -> Vec<&str> {
        match self {
            Change::Upserted(person) => vec![person.profile_id.as_str()],
            Change::Merged { survivor, .. } => vec![survivor.as_str()],
            Change::Erased { .. } => Vec::new(),
            Change::Events(events) => events.iter().map(|e| e.profile_id.as_str()).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub profile_id: String,
    pub region: String,
    /// `(kind, value)` pairs.
    pub identifiers: Vec<(String, String)>,
    pub merged_ids: Vec<String>,
    pub traits: BTreeMap<String, Stored>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub profile_id: String,
    pub name: String,
    pub occurred_at_micros: i64,
    pub properties: BTreeMap<String, Stored>,
}

/// Who an export takes.
pub enum Selection<'s, 'c> {
    /// Whoever the rule matches now.
    Rule(&'s Rule, &'s Compiler<'c>),
    /// Whoever was a member of the segment at a membership cursor (the
    /// `cursor` a computation ended at), so a sync can be reproduced.
    Snapshot { segment_id: &'s str, cursor: u64 },
    /// Whoever is a member of the segment now, as recorded.
    Members { segment_id: &'s str },
    /// These people, whatever their memberships.
    People(&'s [String]),
}

/// A page of an export: its members' documents, concatenated in id order.
/// (No `Debug`: the documents are personal data.)
#[derive(Default)]
pub struct ExportPage {
    /// An encoded `ExportAudienceResponse` holding the page's members.
    pub documents: Vec<u8>,
    /// How many members the page holds.
    pub members: u64,
    /// The page's last profile id, where the next page starts after; `None`
    /// for an empty page.
    pub last: Option<String>,
}

/// A member as an export sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub profile_id: String,
    pub region: String,
    pub identifiers: Vec<(String, String)>,
    pub merged_ids: Vec<String>,
    /// `YYYY-MM-DD` from the birth-date trait, when the person has one that
    /// reads as a date.
    pub birth_date: Option<String>,
}

/// Key of the PostgreSQL advisory lock under which a page is applied, so
/// replicas following the same stream take turns and skip what is done.
const APPLY_LOCK: i64 = 0x6d61_6474_6563_6805;

/// People given an export document per transaction when documents are
/// rebuilt.
const DOCS_PER_PAGE: usize = 1_000;

pub struct Projection {
    db: DatabaseConnection,
    writes: WriteLock,
    /// The trait holding a person's birth date, exported for the gateway's
    /// age bands.
    birth_date_trait: String,
    statistics: Statistics,
}

/// A date from a trait's text: `YYYY-MM-DD`, or an RFC 3339 time.
fn date_of_text(text: &str) -> Option<chrono::NaiveDate> {
    let text = text.trim();
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .or_else(|| {
            chrono::DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|at| at.date_naive())
        })
}

/// One member as an export page's JSON carries it: id, region,
/// `[[kind, value]…]`, `[merged id…]`, `[kind, string, int]` of the birth
/// date trait. Empty aggregates are `null` on PostgreSQL.
#[derive(serde::Deserialize)]
struct PageEntry(
    String,
    String,
    Option<Vec<(String, String)>>,
    Option<Vec<String>>,
    Option<(String, Option<String>, Option<i64>)>,
);

impl PageEntry {
    fn into_member(self) -> Member {
        let PageEntry(profile_id, region, identifiers, merged_ids, birth_date) = self;
        let mut identifiers = identifiers.unwrap_or_default();
        identifiers.sort_unstable();
        let mut merged_ids = merged_ids.unwrap_or_default();
        merged_ids.sort_unstable();
        let birth_date = birth_date.and_then(|(kind, text, micros)| {
            birth_date_of(&stored_from_columns(&kind, text, None, micros))
        });
        Member {
            profile_id,
            region,
            identifiers,
            merged_ids,
            birth_date,
        }
    }
}

/// `YYYY-MM-DD` of a birth-date trait's value, when it reads as a date.
fn birth_date_of(value: &Stored) -> Option<String> {
    let date = match value {
        Stored::Value(Value::String(text)) => date_of_text(text),
        Stored::Value(Value::Timestamp(micros)) => {
            chrono::DateTime::from_timestamp_micros(*micros).map(|at| at.date_naive())
        }
        _ => None,
    };
    date.map(|date| date.to_string())
}

impl Snapshot {
    /// The person as an export sends them.
    fn member(&self, birth_date_trait: &str) -> Member {
        let mut identifiers = self.identifiers.clone();
        identifiers.sort_unstable();
        let mut merged_ids = self.merged_ids.clone();
        merged_ids.sort_unstable();
        Member {
            profile_id: self.profile_id.clone(),
            region: self.region.clone(),
            identifiers,
            merged_ids,
            birth_date: self.traits.get(birth_date_trait).and_then(birth_date_of),
        }
    }
}

/// `(kind, string, number, int)` columns of a stored value.
fn columns(value: &Stored) -> (&'static str, Option<String>, Option<f64>, Option<i64>) {
    match value {
        Stored::Value(Value::String(s)) => ("string", Some(s.clone()), None, None),
        Stored::Value(Value::Number(n)) => ("number", None, Some(*n), None),
        Stored::Value(Value::Bool(b)) => ("bool", None, None, Some(i64::from(*b))),
        Stored::Value(Value::Timestamp(t)) => ("timestamp", None, None, Some(*t)),
        Stored::Other => ("other", None, None, None),
    }
}

/// A stored value read back from the typed value columns of `row`.
fn stored_from_row(row: &sea_orm::QueryResult) -> Result<Stored, SegmentError> {
    Ok(stored_from_columns(
        &row.try_get::<String>("", "kind")?,
        row.try_get("", "string_value")?,
        row.try_get("", "number_value")?,
        row.try_get("", "int_value")?,
    ))
}

fn stored_from_columns(kind: &str, s: Option<String>, n: Option<f64>, i: Option<i64>) -> Stored {
    match (kind, s, n, i) {
        ("string", Some(s), _, _) => Stored::Value(Value::String(s)),
        ("number", _, Some(n), _) => Stored::Value(Value::Number(n)),
        ("bool", _, _, Some(i)) => Stored::Value(Value::Bool(i != 0)),
        ("timestamp", _, _, Some(i)) => Stored::Value(Value::Timestamp(i)),
        _ => Stored::Other,
    }
}

/// Deletes everything the projection holds about `ids`.
async fn forget(
    txn: &DatabaseTransaction,
    ids: &[String],
    keep_events: bool,
) -> Result<(), SegmentError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut tables = vec![
        "person_traits",
        "person_identifiers",
        "person_merged",
        "people",
    ];
    if !keep_events {
        let mut sql = Sql::new(
            "DELETE FROM event_properties WHERE event_id IN (SELECT id FROM person_events WHERE profile_id IN ",
        );
        sql.bind_list(ids).push(")");
        execute(txn, &sql).await?;
        tables.insert(0, "person_events");
    }
    for table in tables {
        let mut sql = Sql::new(&format!("DELETE FROM {table} WHERE profile_id IN "));
        sql.bind_list(ids);
        execute(txn, &sql).await?;
    }
    Ok(())
}

impl Projection {
    pub fn new(db: DatabaseConnection, writes: WriteLock) -> Self {
        Projection {
            db,
            writes,
            birth_date_trait: "birthdate".into(),
            statistics: Statistics::of(
                "people, person_traits, person_identifiers, person_merged, person_events, \
                 event_properties",
            ),
        }
    }

    /// Reads birth dates from the trait `name` (default `birthdate`).
    pub fn with_birth_date_trait(mut self, name: &str) -> Self {
        self.birth_date_trait = name.to_string();
        self
    }

    /// How many rows of the projection still hold any of these profile ids
    /// or identifiers (a data-subject request's completeness check).
    pub async fn rows_about(
        &self,
        profile_ids: &[String],
        identifiers: &[(String, String)],
    ) -> Result<u64, SegmentError> {
        let mut total = 0;
        if !profile_ids.is_empty() {
            for table in [
                "people",
                "person_identifiers",
                "person_traits",
                "person_merged",
                "person_events",
            ] {
                let mut sql = Sql::new(&format!(
                    "SELECT count(*) AS n FROM {table} WHERE profile_id IN "
                ));
                sql.bind_list(profile_ids);
                total += number(&self.db, &sql).await?;
            }
        }
        for (kind, value) in identifiers {
            let mut sql = Sql::new("SELECT count(*) AS n FROM person_identifiers WHERE kind = ");
            sql.bind(kind.clone())
                .push(" AND value = ")
                .bind(value.clone());
            total += number(&self.db, &sql).await?;
        }
        Ok(total)
    }

    /// The cursor of the last change applied (0 before the first).
    pub async fn cursor(&self) -> Result<u64, SegmentError> {
        number(
            &self.db,
            &Sql::new("SELECT cursor AS n FROM projection_state WHERE id = 1"),
        )
        .await
        .map_err(Into::into)
    }

    /// Applies `changes` (each with its cursor) in order and records the last
    /// cursor, in one transaction. Changes at or below the stored cursor are
    /// skipped, so a page applied twice (a retry, or two replicas following
    /// the same stream into one database) changes nothing the second time.
    pub async fn apply(&self, changes: &[(u64, Change)]) -> Result<(), SegmentError> {
        let Some((last, _)) = changes.last() else {
            return Ok(());
        };
        let (_writing, txn) = self.begin_writing().await?;
        let result = async {
            let applied = number(
                &txn,
                &Sql::new("SELECT cursor AS n FROM projection_state WHERE id = 1"),
            )
            .await?;
            // Consecutive upserts and consecutive event batches are written
            // together, a few hundred rows per statement; merges and erasures
            // in between keep their place in the order.
            let mut run = Run {
                birth_date_trait: &self.birth_date_trait,
                people: Vec::new(),
                events: Vec::new(),
            };
            let mut rows = 0;
            for (cursor, change) in changes {
                if *cursor <= applied {
                    continue;
                }
                match change {
                    Change::Upserted(person) => {
                        if !run.events.is_empty() {
                            run.flush(&txn).await?;
                        }
                        run.people.push(person);
                        rows += 1;
                    }
                    Change::Events(events) => {
                        if !run.people.is_empty() {
                            run.flush(&txn).await?;
                        }
                        run.events.extend(events);
                        rows += events.len() as u64;
                    }
                    Change::Merged { survivor, merged } => {
                        run.flush(&txn).await?;
                        absorb(&txn, survivor, merged).await?;
                    }
                    Change::Erased { profile_ids } => {
                        run.flush(&txn).await?;
                        forget(&txn, profile_ids, false).await?;
                        membership::leave_everything(&txn, profile_ids, now()).await?;
                    }
                }
            }
            run.flush(&txn).await?;
            let cursor = i64::try_from((*last).max(applied)).unwrap_or(i64::MAX);
            let mut upsert = Sql::new("INSERT INTO projection_state (id, cursor) VALUES (1, ");
            upsert
                .bind(cursor)
                .push(") ON CONFLICT (id) DO UPDATE SET cursor = excluded.cursor");
            execute(&txn, &upsert).await?;
            Ok::<_, SegmentError>(rows)
        }
        .await;
        let rows = settle(txn, result).await?;
        self.statistics.wrote(&self.db, rows).await;
        Ok(())
    }

    /// Everyone in the projection.
    pub async fn people(&self) -> Result<u64, SegmentError> {
        number(&self.db, &Sql::new("SELECT count(*) AS n FROM people"))
            .await
            .map_err(Into::into)
    }

    /// Up to `limit` people with ids after `after`, in id order, each with
    /// whether `rule` matches them.
    pub async fn evaluate_page(
        &self,
        rule: &Rule,
        compiler: &Compiler<'_>,
        after: &str,
        limit: u64,
    ) -> Result<Vec<(String, bool)>, SegmentError> {
        let sql = compiler.page_evaluation(rule, after, limit)?;
        self.matches(&sql).await
    }

    /// Whether `rule` matches each of `profile_ids` that still exists.
    pub async fn evaluate_ids(
        &self,
        rule: &Rule,
        compiler: &Compiler<'_>,
        profile_ids: &[String],
    ) -> Result<Vec<(String, bool)>, SegmentError> {
        if profile_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("SELECT people.profile_id, CASE WHEN ");
        compiler.condition(&mut sql, rule)?;
        sql.push(" THEN 1 ELSE 0 END AS matches FROM people WHERE people.profile_id IN ")
            .bind_list(profile_ids);
        self.matches(&sql).await
    }

    /// Runs an evaluation query (`profile_id`, `matches` per person) with
    /// its rows answered as one JSON array (see [`JsonFunctions`]).
    async fn matches(&self, evaluation: &Sql) -> Result<Vec<(String, bool)>, SegmentError> {
        let json = JsonFunctions::of(self.db.get_database_backend());
        let mut sql = Sql::new(&format!(
            "SELECT {}({}(q.profile_id, q.matches)){} AS page FROM (",
            json.group, json.array, json.as_text
        ));
        sql.append(evaluation).push(") q");
        let rows: Vec<(String, i32)> = json_page(&self.db, &sql).await?;
        let mut evaluated: Vec<(String, bool)> = rows
            .into_iter()
            .map(|(id, matches)| (id, matches != 0))
            .collect();
        // Aggregates do not promise an order; a page's is the id order.
        evaluated.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(evaluated)
    }

    /// How many people `rule` matches.
    pub async fn count(&self, rule: &Rule, compiler: &Compiler<'_>) -> Result<u64, SegmentError> {
        let mut sql = Sql::new("SELECT count(*) AS n FROM people WHERE ");
        compiler.condition(&mut sql, rule)?;
        number(&self.db, &sql).await.map_err(Into::into)
    }

    /// Members with ids after `after`, in id order, at most `limit`.
    pub async fn members(
        &self,
        selection: Selection<'_, '_>,
        after: &str,
        limit: u64,
    ) -> Result<Vec<Member>, SegmentError> {
        let page = self.export_page(selection, after, limit).await?;
        export_doc::decode_page(&page.documents)
            .map_err(|err| SegmentError::Corrupt(format!("an export page: {err}")))
    }

    /// The export documents of the members with ids after `after`, in id
    /// order, at most `limit`, concatenated: an encoded
    /// `ExportAudienceResponse` (see [`export_doc`]).
    ///
    /// Each person's document was encoded when they last changed, and the
    /// database concatenates a page's documents into one value, so an export
    /// neither assembles members from their identifiers, merged ids and
    /// traits nor moves rows out of the database one by one — what a large
    /// audience's export used to spend its time on.
    pub async fn export_page(
        &self,
        selection: Selection<'_, '_>,
        after: &str,
        limit: u64,
    ) -> Result<ExportPage, SegmentError> {
        let backend = self.backend();
        // The page is sent as it comes, so its order matters: PostgreSQL
        // is told it; SQLite concatenates in the order the ordered subquery
        // feeds it (an ORDER BY inside its aggregate sorts the page again
        // through a temporary b-tree), and `walk_page` below checks the
        // order either way.
        let concatenated = match backend {
            DbBackend::Postgres => {
                "string_agg(page.export_doc, ''::bytea ORDER BY page.profile_id)"
            }
            // SQLite's group_concat keeps a blob's bytes, NULs included, and
            // answers them as text; the cast hands them over as a blob.
            _ => "CAST(group_concat(page.export_doc, '') AS BLOB)",
        };
        let mut sql = Sql::new(&format!(
            "SELECT {concatenated} AS page, count(*) AS n, count(page.export_doc) AS docs \
             FROM (SELECT people.profile_id, people.export_doc FROM people WHERE people.profile_id > "
        ));
        sql.bind(after.to_string()).push(" AND ");
        match selection {
            Selection::Rule(rule, compiler) => compiler.condition(&mut sql, rule)?,
            Selection::Snapshot { segment_id, cursor } => {
                // Members as of `cursor`: the person's last membership change
                // up to it is an entry. People erased since are gone from
                // `people`, so an old snapshot never brings them back.
                let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
                sql.push("EXISTS (SELECT 1 FROM membership_changes mc WHERE mc.segment_id = ")
                    .bind(segment_id.to_string())
                    .push(" AND mc.profile_id = people.profile_id AND mc.entered = 1 AND mc.seq = (SELECT max(m2.seq) FROM membership_changes m2 WHERE m2.segment_id = mc.segment_id AND m2.profile_id = mc.profile_id AND m2.seq <= ")
                    .bind(cursor)
                    .push("))");
            }
            Selection::Members { segment_id } => {
                sql.push("EXISTS (SELECT 1 FROM memberships m WHERE m.segment_id = ")
                    .bind(segment_id.to_string())
                    .push(" AND m.profile_id = people.profile_id)");
            }
            Selection::People(ids) => {
                sql.push("people.profile_id IN ").bind_list(ids);
            }
        }
        sql.push(" ORDER BY people.profile_id LIMIT ")
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .push(") page");
        let Some(row) = self.db.query_one_raw(sql.statement(backend)).await? else {
            return Ok(ExportPage::default());
        };
        let (selected, documents): (i64, i64) = (row.try_get("", "n")?, row.try_get("", "docs")?);
        if selected != documents {
            // Someone without a document would be left out silently.
            return Err(SegmentError::Corrupt(format!(
                "{} of {selected} people selected for export have no export document",
                selected - documents
            )));
        }
        let documents: Vec<u8> = row
            .try_get::<Option<Vec<u8>>>("", "page")?
            .unwrap_or_default();
        let (members, last) =
            export_doc::walk_page(&documents, after).map_err(SegmentError::Corrupt)?;
        if members != u64::try_from(selected).unwrap_or(0) {
            return Err(SegmentError::Corrupt(format!(
                "an export page of {selected} people holds {members} documents"
            )));
        }
        Ok(ExportPage {
            documents,
            members,
            last,
        })
    }

    /// Makes every person's export document current, before the service
    /// serves: documents built under another key (format, birth-date trait)
    /// are cleared, and people without one (all of them after an upgrade)
    /// get one, a page at a time. Answers how many were built.
    pub async fn prepare_export_docs(&self) -> Result<u64, SegmentError> {
        let key = export_doc::key(&self.birth_date_trait);
        {
            let (_writing, txn) = self.begin_writing().await?;
            let result = async {
                let row = txn
                    .query_one_raw(
                        Sql::new("SELECT export_docs FROM projection_state WHERE id = 1")
                            .statement(txn.get_database_backend()),
                    )
                    .await?;
                let stored: Option<String> = match row {
                    Some(row) => row.try_get("", "export_docs")?,
                    None => None,
                };
                if stored.as_deref() != Some(key.as_str()) {
                    execute(&txn, &Sql::new("UPDATE people SET export_doc = NULL")).await?;
                    let mut upsert = Sql::new(
                        "INSERT INTO projection_state (id, cursor, export_docs) VALUES (1, 0, ",
                    );
                    upsert.bind(key).push(
                        ") ON CONFLICT (id) DO UPDATE SET export_docs = excluded.export_docs",
                    );
                    execute(&txn, &upsert).await?;
                }
                Ok::<_, SegmentError>(())
            }
            .await;
            settle(txn, result).await?;
        }
        let mut built = 0;
        loop {
            // Under the write lock, so a newer document that `apply` writes
            // is never overwritten with an older state.
            let (_writing, txn) = self.begin_writing().await?;
            let result = async {
                let members = self.assembled_without_docs(&txn).await?;
                if members.is_empty() {
                    return Ok(None);
                }
                let page = members.len() as u64;
                // Everyone here has a row: the upsert only fills their document.
                insert_rows(
                    &txn,
                    PEOPLE_COLUMNS,
                    " ON CONFLICT (profile_id) DO UPDATE SET export_doc = excluded.export_doc",
                    members.into_iter().map(people_row).collect(),
                )
                .await?;
                Ok::<_, SegmentError>(Some(page))
            }
            .await;
            let Some(page) = settle(txn, result).await? else {
                return Ok(built);
            };
            built += page;
            // A large projection takes a while; say how far it is.
            if built % 100_000 < page {
                tracing::info!(people = built, "building export documents");
            }
        }
    }

    /// People without an export document, assembled from the projection's
    /// tables; the database builds the page as one JSON document.
    async fn assembled_without_docs(
        &self,
        txn: &DatabaseTransaction,
    ) -> Result<Vec<Member>, SegmentError> {
        let JsonFunctions {
            group,
            array,
            embed,
            as_text,
            ..
        } = JsonFunctions::of(self.backend());
        let mut sql = Sql::new(&format!(
            "WITH page AS (SELECT people.profile_id, people.region FROM people \
             WHERE people.export_doc IS NULL ORDER BY people.profile_id LIMIT {DOCS_PER_PAGE}) \
             SELECT {group}({array}(page.profile_id, page.region, \
             {embed}((SELECT {group}({array}(pi.kind, pi.value)) FROM person_identifiers pi WHERE pi.profile_id = page.profile_id)), \
             {embed}((SELECT {group}(pm.merged_id) FROM person_merged pm WHERE pm.profile_id = page.profile_id)), \
             {embed}((SELECT {array}(pt.kind, pt.string_value, pt.int_value) FROM person_traits pt WHERE pt.profile_id = page.profile_id AND pt.name = "
        ));
        sql.bind(self.birth_date_trait.clone())
            .push(&format!(")))){as_text} AS page FROM page"));
        let page: Vec<PageEntry> = json_page(txn, &sql).await?;
        Ok(page.into_iter().map(PageEntry::into_member).collect())
    }

    /// The write lock and a transaction holding PostgreSQL's apply lock, so
    /// replicas writing the same database take turns.
    async fn begin_writing(
        &self,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, DatabaseTransaction), SegmentError> {
        let writing = self.writes.clone().lock_owned().await;
        let txn = self.db.begin().await?;
        if txn.get_database_backend() == DbBackend::Postgres {
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({APPLY_LOCK})"))
                .await?;
        }
        Ok((writing, txn))
    }

    async fn rows_for(
        &self,
        head: &str,
        ids: &[String],
        tail: &str,
    ) -> Result<Vec<sea_orm::QueryResult>, SegmentError> {
        let mut sql = Sql::new(head);
        sql.bind_list(ids).push(tail);
        Ok(self
            .db
            .query_all_raw(sql.statement(self.db.get_database_backend()))
            .await?)
    }

    /// One person as the in-memory evaluator sees them.
    pub async fn person(&self, profile_id: &str) -> Result<Option<Person>, SegmentError> {
        let ids = [profile_id.to_string()];
        let people = self
            .rows_for("SELECT region FROM people WHERE profile_id IN ", &ids, "")
            .await?;
        let Some(row) = people.first() else {
            return Ok(None);
        };
        let mut person = Person {
            region: row.try_get("", "region")?,
            ..Person::default()
        };
        for row in self.rows_for("SELECT name, kind, string_value, number_value, int_value FROM person_traits WHERE profile_id IN ", &ids, "").await? {
            person.traits.insert(
                row.try_get("", "name")?,
                stored_from_row(&row)?,
            );
        }
        for row in self
            .rows_for(
                "SELECT DISTINCT kind FROM person_identifiers WHERE profile_id IN ",
                &ids,
                "",
            )
            .await?
        {
            person.identifier_kinds.insert(row.try_get("", "kind")?);
        }
        let mut events: BTreeMap<i64, PersonEvent> = BTreeMap::new();
        for row in self
            .rows_for(
                "SELECT id, name, occurred_at FROM person_events WHERE profile_id IN ",
                &ids,
                "",
            )
            .await?
        {
            events.insert(
                row.try_get("", "id")?,
                PersonEvent {
                    name: row.try_get("", "name")?,
                    occurred_at_micros: row.try_get("", "occurred_at")?,
                    properties: BTreeMap::new(),
                },
            );
        }
        for row in self.rows_for("SELECT ep.event_id, ep.name, ep.kind, ep.string_value, ep.number_value, ep.int_value FROM event_properties ep JOIN person_events e ON e.id = ep.event_id WHERE e.profile_id IN ", &ids, "").await? {
            if let Some(event) = events.get_mut(&row.try_get::<i64>("", "event_id")?) {
                event.properties.insert(
                    row.try_get("", "name")?,
                    stored_from_row(&row)?,
                );
            }
        }
        person.events = events.into_values().collect();
        Ok(Some(person))
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }
}

/// Changes waiting to be written together.
struct Run<'a> {
    birth_date_trait: &'a str,
    people: Vec<&'a Snapshot>,
    events: Vec<&'a NewEvent>,
}

impl Run<'_> {
    async fn flush(&mut self, txn: &DatabaseTransaction) -> Result<(), SegmentError> {
        if !self.people.is_empty() {
            write_people(txn, &self.people, self.birth_date_trait).await?;
            self.people.clear();
        }
        if !self.events.is_empty() {
            write_events(txn, &self.events).await?;
            self.events.clear();
        }
        Ok(())
    }
}

fn value_row(value: &Stored) -> [sea_orm::Value; 4] {
    let (kind, s, n, i) = columns(value);
    [kind.to_string().into(), s.into(), n.into(), i.into()]
}

/// The `people` row of a person: columns [`PEOPLE_COLUMNS`].
fn people_row(member: Member) -> Vec<sea_orm::Value> {
    vec![
        member.profile_id.clone().into(),
        member.region.clone().into(),
        export_doc::encode(member).into(),
    ]
}

const PEOPLE_COLUMNS: &str = "people (profile_id, region, export_doc)";

/// People's current state replaces what was projected of them (their
/// events stay), export document included.
async fn write_people(
    txn: &DatabaseTransaction,
    people: &[&Snapshot],
    birth_date_trait: &str,
) -> Result<(), SegmentError> {
    // The last snapshot of a person in the run is their state.
    let mut latest: BTreeMap<&str, &Snapshot> = BTreeMap::new();
    for person in people {
        latest.insert(person.profile_id.as_str(), person);
    }
    let ids: Vec<String> = latest.keys().map(|id| id.to_string()).collect();
    for chunk in ids.chunks(MAX_BINDS) {
        forget(txn, chunk, true).await?;
    }
    let people: Vec<&Snapshot> = latest.into_values().collect();
    insert_rows(
        txn,
        PEOPLE_COLUMNS,
        "",
        people
            .iter()
            .map(|p| people_row(p.member(birth_date_trait)))
            .collect(),
    )
    .await?;
    insert_rows(
        txn,
        "person_identifiers (profile_id, kind, value)",
        " ON CONFLICT DO NOTHING",
        people
            .iter()
            .flat_map(|p| {
                p.identifiers.iter().map(|(kind, value)| {
                    vec![
                        p.profile_id.clone().into(),
                        kind.clone().into(),
                        value.clone().into(),
                    ]
                })
            })
            .collect(),
    )
    .await?;
    insert_rows(
        txn,
        "person_merged (profile_id, merged_id)",
        " ON CONFLICT DO NOTHING",
        people
            .iter()
            .flat_map(|p| {
                p.merged_ids
                    .iter()
                    .map(|merged| vec![p.profile_id.clone().into(), merged.clone().into()])
            })
            .collect(),
    )
    .await?;
    insert_rows(
        txn,
        "person_traits (profile_id, name, kind, string_value, number_value, int_value)",
        "",
        people
            .iter()
            .flat_map(|p| {
                p.traits.iter().map(|(name, value)| {
                    let mut row = vec![p.profile_id.clone().into(), name.clone().into()];
                    row.extend(value_row(value));
                    row
                })
            })
            .collect(),
    )
    .await
    .map_err(Into::into)
}

/// Events with their properties. Ids are handed out here, after the
/// largest one stored, so properties need no id back from each insert; the
/// apply lock makes this the only writer.
async fn write_events(txn: &DatabaseTransaction, events: &[&NewEvent]) -> Result<(), SegmentError> {
    let first = number(txn, &Sql::new("SELECT max(id) AS n FROM person_events")).await? + 1;
    let first = i64::try_from(first).unwrap_or(i64::MAX);
    let ids = (first..).take(events.len());
    let mut event_rows = Vec::with_capacity(events.len());
    let mut property_rows = Vec::new();
    for (id, event) in ids.zip(events) {
        event_rows.push(vec![
            id.into(),
            event.profile_id.clone().into(),
            event.name.clone().into(),
            event.occurred_at_micros.into(),
        ]);
        for (name, value) in &event.properties {
            let mut row = vec![id.into(), name.clone().into()];
            row.extend(value_row(value));
            property_rows.push(row);
        }
    }
    insert_rows(
        txn,
        "person_events (id, profile_id, name, occurred_at)",
        "",
        event_rows,
    )
    .await?;
    insert_rows(
        txn,
        "event_properties (event_id, name, kind, string_value, number_value, int_value)",
        "",
        property_rows,
    )
    .await
    .map_err(Into::into)
}

/// `merged` became part of `survivor`: their events move to the survivor,
/// the survivor's snapshot follows and brings the merged state, and the
/// merged-away ids leave their segments (the survivor is evaluated as
/// themselves).
async fn absorb(
    txn: &DatabaseTransaction,
    survivor: &str,
    merged: &[String],
) -> Result<(), SegmentError> {
    for id in merged {
        let mut sql = Sql::new("UPDATE person_events SET profile_id = ");
        sql.bind(survivor.to_string())
            .push(" WHERE profile_id = ")
            .bind(id.clone());
        execute(txn, &sql).await?;
    }
    forget(txn, merged, true).await?;
    membership::leave_everything(txn, merged, now()).await?;
    Ok(())
}

mod export_doc;
#[cfg(test)]
mod tests;
