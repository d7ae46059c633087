//! The schemas of the shared state in both dialects: each applies, to a real SQLite
//! file and to a real PostgreSQL database, and both give the same tables with the same
//! columns, so the embedded and the clustered store cannot drift apart.

mod support;

use std::collections::BTreeMap;

use smartrelay::store::schema::{Schema, ALL};
use smartrelay::store::sqlite::Db;
use smartrelay::store::Postgres;
use support::cluster::Pg;
use support::tmpdir;

/// Tables and their columns (lower-case, in order) as SQLite has them after `schema`.
fn sqlite_tables(schema: &Schema) -> BTreeMap<String, Vec<String>> {
    let dir = tmpdir(&format!("schema-{}", schema.name));
    let db = Db::open(&dir.join("db.sqlite3"), &[schema], true).expect("SQLite dialect applies");
    let conn = db.lock();
    let mut st = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'schema_versions'",
        )
        .unwrap();
    let names: Vec<String> = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    names
        .into_iter()
        .map(|t| {
            let mut st = conn.prepare(&format!("PRAGMA table_info({t})")).unwrap();
            let cols = st
                .query_map([], |r| r.get::<_, String>(1))
                .unwrap()
                .map(|c| c.unwrap().to_lowercase())
                .collect();
            (t, cols)
        })
        .collect()
}

/// The same, from PostgreSQL's catalogue, for the tables `sqlite` names.
fn pg_tables(pg: &Pg, names: &[String]) -> BTreeMap<String, Vec<String>> {
    names
        .iter()
        .map(|t| {
            let cols = pg.query(&format!(
                "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = '{t}'"
            ));
            (
                t.clone(),
                cols.split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn both_dialects_make_the_same_tables() {
    let pg = Pg::start("schema");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = pg.url();
    rt.block_on(async {
        let cfg: smartrelay::config::StoreConfig =
            toml::from_str(&format!("kind = \"postgres\"\nurl = \"{url}\"\n")).unwrap();
        let store = Postgres::new(&cfg).unwrap();
        store
            .migrate(ALL)
            .await
            .expect("PostgreSQL dialect applies");
        // A second node starting later applies nothing twice.
        store.migrate(ALL).await.expect("migrations are idempotent");
    });
    for schema in ALL {
        let lite = sqlite_tables(schema);
        assert!(!lite.is_empty(), "{}", schema.name);
        // The one deliberate difference: the list's `meta` is `trusted_meta` where it
        // shares a database with the relay state's own `meta`.
        let pg_names: Vec<String> = lite
            .keys()
            .map(|t| match (schema.name, t.as_str()) {
                ("trusted", "meta") => "trusted_meta".to_string(),
                _ => t.clone(),
            })
            .collect();
        let theirs = pg_tables(&pg, &pg_names);
        for ((table, cols), pg_name) in lite.iter().zip(&pg_names) {
            assert_eq!(
                Some(cols),
                theirs.get(pg_name),
                "{}: table {table} differs between the dialects",
                schema.name
            );
        }
        let version = pg.query(&format!(
            "SELECT version FROM smartrelay_schema_versions WHERE name = '{}'",
            schema.name
        ));
        assert_eq!(version, schema.migrations.len().to_string());
    }
}
