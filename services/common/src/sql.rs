//! Hand-written SQL for both backends: text with `?` placeholders and
//! bound values (PostgreSQL gets them numbered), for the statements the
//! query builder does not express well (window functions, `UPDATE … FROM`,
//! JSON assembly). Every literal is a bound value; the text holds only what
//! the caller wrote.

use sea_orm::DbBackend;
use sea_orm::{ConnectionTrait, DbErr, Statement, Value};

use crate::error::json_error;

/// SQL text with `?` placeholders and their values.
#[derive(Debug, Default, Clone)]
pub struct Sql {
    text: String,
    values: Vec<Value>,
}

impl Sql {
    pub fn new(text: &str) -> Self {
        Sql {
            text: text.to_string(),
            values: Vec::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.text.push('?');
        self.values.push(value.into());
        self
    }

    /// Appends `other`'s text and values (a subquery).
    pub fn append(&mut self, other: &Sql) -> &mut Self {
        self.text.push_str(&other.text);
        self.values.extend(other.values.iter().cloned());
        self
    }

    /// Appends `(?, ?, …)` binding each value; `values` must not be empty.
    pub fn bind_list<'v, V: Into<Value> + Clone + 'v>(
        &mut self,
        values: impl IntoIterator<Item = &'v V>,
    ) -> &mut Self {
        self.push("(");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value.clone());
        }
        self.push(")")
    }

    /// The statement for `backend` (PostgreSQL numbers its placeholders).
    pub fn statement(&self, backend: DbBackend) -> Statement {
        let text = if backend == DbBackend::Postgres {
            let mut numbered = String::with_capacity(self.text.len() + 16);
            let mut n = 0;
            for c in self.text.chars() {
                if c == '?' {
                    n += 1;
                    numbered.push('$');
                    numbered.push_str(&n.to_string());
                } else {
                    numbered.push(c);
                }
            }
            numbered
        } else {
            self.text.clone()
        };
        Statement::from_sql_and_values(backend, text, self.values.clone())
    }
}

/// Bound values per statement: below every backend's limit.
pub const MAX_BINDS: usize = 900;

/// Bound values per [`insert_rows`] statement on PostgreSQL (whose limit is
/// 65,535): over TCP, sqlx 0.9 leaves Nagle's algorithm on and every
/// statement longer than a segment waits ~40 ms for a delayed ACK, so a
/// thousand-event batch is better one statement than eight.
const POSTGRES_MAX_BINDS: usize = 30_000;

/// `INSERT INTO {head} VALUES (…), (…)…{tail}` for `rows`, as many
/// statements as the bind limit asks for.
pub async fn insert_rows<C: ConnectionTrait>(
    txn: &C,
    head: &str,
    tail: &str,
    rows: Vec<Vec<sea_orm::Value>>,
) -> Result<(), DbErr> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(());
    };
    let binds = if txn.get_database_backend() == DbBackend::Postgres {
        POSTGRES_MAX_BINDS
    } else {
        MAX_BINDS
    };
    for chunk in rows.chunks((binds / width.max(1)).max(1)) {
        let mut sql = Sql::new(&format!("INSERT INTO {head} VALUES "));
        for (i, row) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            for (j, value) in row.iter().enumerate() {
                if j > 0 {
                    sql.push(", ");
                }
                sql.bind(value.clone());
            }
            sql.push(")");
        }
        sql.push(tail);
        execute(txn, &sql).await?;
    }
    Ok(())
}

/// Runs a statement that returns no rows; answers how many rows it changed.
pub async fn execute<C: ConnectionTrait>(db: &C, sql: &Sql) -> Result<u64, DbErr> {
    Ok(db
        .execute_raw(sql.statement(db.get_database_backend()))
        .await?
        .rows_affected())
}

/// Runs a query whose one row has one integer column named `n` (a count,
/// a maximum, a stored cursor); 0 when there is no row or it is NULL.
pub async fn number<C: ConnectionTrait>(db: &C, sql: &Sql) -> Result<u64, DbErr> {
    let row = db
        .query_one_raw(sql.statement(db.get_database_backend()))
        .await?;
    let n: Option<i64> = match row {
        Some(row) => row.try_get("", "n")?,
        None => None,
    };
    Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
}

/// How each backend spells the JSON functions that let one statement
/// answer many rows as one value: with SQLite every row read costs a
/// hand-over between sqlx's worker thread and the caller, so a page of a
/// thousand rows is far cheaper as one JSON array.
#[derive(Debug, Clone, Copy)]
pub struct JsonFunctions {
    /// Aggregates rows into a JSON array.
    pub group: &'static str,
    /// Builds a JSON array from its arguments.
    pub array: &'static str,
    /// Embeds a subquery's JSON as JSON (SQLite forgets that a subquery's
    /// value is JSON and would embed it as a string).
    pub embed: &'static str,
    /// Makes an aggregate's JSON reach the client as text.
    pub as_text: &'static str,
}

impl JsonFunctions {
    pub fn of(backend: DbBackend) -> Self {
        match backend {
            DbBackend::Postgres => JsonFunctions {
                group: "json_agg",
                array: "json_build_array",
                embed: "",
                as_text: "::text",
            },
            _ => JsonFunctions {
                group: "json_group_array",
                array: "json_array",
                embed: "json",
                as_text: "",
            },
        }
    }
}

/// Runs a query whose one row has one JSON-array column named `page` (an
/// aggregate) and decodes its elements; no rows aggregate to NULL, which is
/// an empty list.
pub async fn json_page<T, C>(db: &C, sql: &Sql) -> Result<Vec<T>, DbErr>
where
    T: serde::de::DeserializeOwned,
    C: ConnectionTrait,
{
    let row = db
        .query_one_raw(sql.statement(db.get_database_backend()))
        .await?;
    let page: Option<String> = match row {
        Some(row) => row.try_get("", "page")?,
        None => None,
    };
    match page {
        Some(page) => serde_json::from_str(&page)
            .map_err(|err| DbErr::Custom(format!("a JSON page: {}", json_error(&err)))),
        None => Ok(Vec::new()),
    }
}

/// Keys per statement of [`rows_where_in`] on PostgreSQL: well under its
/// limit of 65,535 bound values.
const KEYS_PER_STATEMENT: usize = 10_000;

/// `columns` of the rows of `table` whose `column` is one of `keys`: a row
/// is the one column's value, or an array of the columns' values when there
/// are several (decode it as a tuple). No order is promised.
///
/// The rows come back as one JSON array. On SQLite the keys go in as one
/// JSON array too, so a thousand-key lookup is one statement with one bound
/// value. PostgreSQL gets them as bound values: it would plan
/// `IN (SELECT json_array_elements_text(…))` once, generically, and keep
/// scanning the whole table once that plan was made while it was small.
pub async fn rows_where_in<T, K, C>(
    db: &C,
    columns: &[&str],
    table: &str,
    column: &str,
    keys: &[K],
) -> Result<Vec<T>, DbErr>
where
    T: serde::de::DeserializeOwned,
    K: AsRef<str>,
    C: ConnectionTrait,
{
    let backend = db.get_database_backend();
    let JsonFunctions {
        group,
        array,
        as_text,
        ..
    } = JsonFunctions::of(backend);
    let row = match columns {
        [one] => one.to_string(),
        _ => format!("{array}({})", columns.join(", ")),
    };
    let head = format!("SELECT {group}({row}){as_text} AS page FROM {table} WHERE {column} IN ");
    let mut found = Vec::new();
    if backend == DbBackend::Postgres {
        for chunk in keys.chunks(KEYS_PER_STATEMENT) {
            let mut query = Sql::new(&head);
            let chunk: Vec<&str> = chunk.iter().map(AsRef::as_ref).collect();
            query.bind_list(&chunk);
            found.extend(json_page(db, &query).await?);
        }
    } else if !keys.is_empty() {
        let list: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        let list = serde_json::to_string(&list)
            .map_err(|err| DbErr::Custom(format!("a JSON list: {err}")))?;
        let mut query = Sql::new(&head);
        query
            .push("(SELECT value FROM json_each(")
            .bind(list)
            .push("))");
        found = json_page(db, &query).await?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;
    use sea_orm::Database;

    crate::backend_tests!(
        rows_where_in_finds_rows_by_a_json_list,
        |db: TestDatabase| async move {
            // One connection, so the schema set below holds for every
            // statement.
            let mut options = sea_orm::ConnectOptions::new(db.config.url.clone());
            options.max_connections(1).sqlx_logging(false);
            let conn = Database::connect(options).await.expect("connect");
            if let Some(schema) = &db.config.schema {
                conn.execute_unprepared(&format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\""
                ))
                .await
                .expect("schema");
            }
            conn.execute_unprepared("CREATE TABLE things (\"key\" TEXT PRIMARY KEY, owner TEXT)")
                .await
                .expect("table");
            insert_rows(
                &conn,
                "things (\"key\", owner)",
                "",
                vec![
                    vec!["a".into(), Some("x").into()],
                    vec!["b\"'quoted".into(), Option::<&str>::None.into()],
                    vec!["c".into(), Some("z").into()],
                ],
            )
            .await
            .expect("rows");

            let mut found: Vec<(String, Option<String>)> = rows_where_in(
                &conn,
                &["\"key\"", "owner"],
                "things",
                "\"key\"",
                &["b\"'quoted", "c", "missing"],
            )
            .await
            .expect("lookup");
            found.sort();
            assert_eq!(
                found,
                vec![
                    ("b\"'quoted".to_string(), None),
                    ("c".to_string(), Some("z".to_string()))
                ]
            );
            let one: Vec<String> = rows_where_in(&conn, &["owner"], "things", "\"key\"", &["a"])
                .await
                .expect("one column");
            assert_eq!(one, vec!["x".to_string()]);
            // Nothing found aggregates to NULL on PostgreSQL: an empty list.
            let none: Vec<String> =
                rows_where_in(&conn, &["owner"], "things", "\"key\"", &["missing"])
                    .await
                    .expect("none");
            assert!(none.is_empty());
            let empty: Vec<String> =
                rows_where_in(&conn, &["owner"], "things", "\"key\"", &[] as &[&str])
                    .await
                    .expect("no keys");
            assert!(empty.is_empty());
        }
    );
}
