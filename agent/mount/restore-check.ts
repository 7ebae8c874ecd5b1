/**
 * The restore check of `blocksnap-appliance verify IMAGE --restore` (issue 9
 * item 8), run by the agent on a mounted copy once PostgreSQL answers.
 *
 * amcheck through SQL, not the pg_amcheck client: pg_amcheck (14+) is a
 * client that calls these same functions, but the agent would need a client
 * of the copy's major on its host, and the version lab has servers 10–18
 * without clients. The copy is writable (its writes go to the mount's
 * overlay, never the image), so `CREATE EXTENSION amcheck` is harmless.
 * Per connectable database (templates excluded):
 *   - verify_heapam(rel, check_toast) of every table, materialized view and
 *     TOAST table, catalogs included (14+: what pg_amcheck checks by default);
 *   - bt_index_check(index, heapallindexed) of every valid btree index
 *     (10: without heapallindexed);
 *   - count(*) of every user table (a table that cannot be read is a problem).
 * An ERROR from any of them (a checksum failure, "index contains corrupted
 * page", …) is recorded as a problem and the check goes on with the next
 * relation; any problem makes the check fail.
 */
import pg from 'pg';
import type { MountResult } from '../../proto/messages.js';

/** The generated RestoreCheck message (proto/blocksnap.proto) as decoded: what MountResult.check carries. */
export type RestoreCheckResult = NonNullable<MountResult['check']>;
export type RestoreCheckTable = RestoreCheckResult['tables'][number];
export type RestoreCheckProblem = RestoreCheckResult['problems'][number];

/** Tables listed in a result (the count of every table is still checked). */
const MAX_TABLES_LISTED = 10_000;
const MAX_PROBLEMS = 100;

export function parseConnection(connection: string): pg.ClientConfig {
  const kv = Object.fromEntries(connection.split(' ').filter(Boolean).map((p) => {
    const i = p.indexOf('=');
    return [p.slice(0, i), p.slice(i + 1)];
  }));
  return { host: kv.host, port: Number(kv.port), user: kv.user, database: kv.dbname };
}

export async function checkRestoredCluster(connection: string): Promise<RestoreCheckResult> {
  const started = process.hrtime.bigint();
  const base = parseConnection(connection);
  const r: RestoreCheckResult = {
    ok: false, method: '', serverVersion: 0, databases: 0, heapsChecked: 0, indexesChecked: 0, tables: [], problems: [], seconds: 0,
  };
  const problem = (database: string, relation: string, e: unknown) => {
    if (r.problems.length < MAX_PROBLEMS) r.problems.push({ database, relation, message: String((e as Error)?.message ?? e).slice(0, 4000) });
  };
  const dbs = await withClient(base, 'postgres', async (c) => {
    r.serverVersion = Number((await c.query<{ v: string }>("SELECT current_setting('server_version_num') AS v")).rows[0]!.v);
    return (await c.query<{ datname: string }>('SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname')).rows.map((x) => x.datname);
  });
  const heap = r.serverVersion >= 140000;
  const allIndexed = r.serverVersion >= 110000;
  r.method = `amcheck (SQL): ${heap ? 'verify_heapam(check_toast) of every table, ' : ''}bt_index_check${allIndexed ? '(heapallindexed)' : ''} of every btree index, count(*) of every table`;
  for (const db of dbs) {
    r.databases++;
    await withClient(base, db, async (c) => {
      try {
        await c.query('CREATE EXTENSION IF NOT EXISTS amcheck');
      } catch (e) {
        return problem(db, 'amcheck', e);
      }
      if (heap) {
        const rels = (await c.query<{ oid: number; name: string }>(
          `SELECT c.oid::int AS oid, c.oid::regclass::text AS name FROM pg_class c
            WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence <> 't' ORDER BY c.oid`)).rows;
        for (const rel of rels) {
          try {
            const bad = (await c.query<{ blkno: string; offnum: number; msg: string }>(
              'SELECT blkno::text, offnum, msg FROM verify_heapam($1::oid::regclass, on_error_stop => false, check_toast => true) LIMIT 5', [rel.oid])).rows;
            for (const b of bad) problem(db, rel.name, `block ${b.blkno}, offset ${b.offnum}: ${b.msg}`);
            r.heapsChecked++;
          } catch (e) {
            problem(db, rel.name, e);
          }
        }
      }
      const idx = (await c.query<{ oid: number; name: string }>(
        `SELECT c.oid::int AS oid, c.oid::regclass::text AS name FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
          WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready ORDER BY c.oid`)).rows;
      for (const ix of idx) {
        try {
          await c.query(allIndexed ? 'SELECT bt_index_check($1::oid::regclass, true)' : 'SELECT bt_index_check($1::oid::regclass)', [ix.oid]);
          r.indexesChecked++;
        } catch (e) {
          problem(db, ix.name, e);
        }
      }
      const tables = (await c.query<{ schema: string; table: string; q: string }>(
        `SELECT n.nspname AS schema, c.relname AS table, format('SELECT count(*)::text AS n FROM ONLY %I.%I', n.nspname, c.relname) AS q
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2`)).rows;
      for (const t of tables) {
        try {
          const rows = Number((await c.query<{ n: string }>(t.q)).rows[0]!.n);
          if (r.tables.length < MAX_TABLES_LISTED) r.tables.push({ database: db, schema: t.schema, table: t.table, rows });
        } catch (e) {
          problem(db, `${t.schema}.${t.table}`, e);
        }
      }
    }).catch((e) => problem(db, '(database)', e));
  }
  r.ok = r.problems.length === 0;
  r.seconds = Number(process.hrtime.bigint() - started) / 1e9;
  return r;
}

async function withClient<T>(base: pg.ClientConfig, database: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ ...base, database, application_name: 'blocksnap-verify', connectionTimeoutMillis: 10_000 });
  // A server that dies mid-check must fail the query, not the agent.
  c.on('error', () => undefined);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => undefined);
  }
}
