//! Hand-written SQL for both backends: text with `?` placeholders and
//! bound values (PostgreSQL gets them numbered), for the statements the
//! query builder does not express well (window functions, `UPDATE … FROM`,
//! JSON assembly). Every literal is a bound value; the text holds only what
//! the caller wrote.

use sea_orm::DbBackend;
use sea_orm::{ConnectionTrait, DbErr, Statement, Value};

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

    /// Appends `(?, ?, …)` binding each value; `values` must not be empty.
    pub fn bind_list<V: Into<Value> + Clone>(&mut self, values: &[V]) -> &mut Self {
        self.push("(");
        for (i, value) in values.iter().enumerate() {
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
    for chunk in rows.chunks((MAX_BINDS / width.max(1)).max(1)) {
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

/// Runs a statement that returns no rows.
pub async fn execute<C: ConnectionTrait>(db: &C, sql: &Sql) -> Result<(), DbErr> {
    db.execute_raw(sql.statement(db.get_database_backend()))
        .await?;
    Ok(())
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
