import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { PG15_CLIENT_BIN } from '../../scripts/lab/version-lab.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';

/**
 * Test helper: are the data checksums of a cluster clean?
 *
 * pg_checksums of the Debian 15 build reads clusters whose pg_control
 * version it knows (13–16): `pg_checksums --check` on the stopped cluster.
 * For the other versions (no pg_checksums ships with them here) the cluster
 * is restarted and every block of every permanent relation of the database
 * is read through the server with pg_prewarm: a read verifies the block's
 * checksum and fails the statement on a mismatch. The cluster is left
 * stopped either way.
 */
export interface ChecksumCheck {
  ok: boolean;
  method: 'pg_checksums' | 'read-all';
  /** Blocks checked (pg_checksums' "Blocks scanned", or blocks read). */
  blocks: number;
  output: string;
}

async function postgresIds(): Promise<{ uid: number; gid: number }> {
  const line = (await readFile('/etc/passwd', 'utf8')).split('\n').find((l) => l.startsWith('postgres:'))!;
  const [, , uid, gid] = line.split(':');
  return { uid: Number(uid), gid: Number(gid) };
}

export async function checkChecksums(c: PgCluster, versionNum: number, database = 'postgres'): Promise<ChecksumCheck> {
  if (versionNum >= 130000 && versionNum < 170000) {
    await c.stop();
    const r = await execa(path.join(PG15_CLIENT_BIN, 'pg_checksums'), ['--check', '-D', c.dataDir], { ...(await postgresIds()), cwd: '/', reject: false, stdin: 'ignore' });
    const output = `${String(r.stdout)}\n${String(r.stderr)}`;
    const bad = /Bad checksums:\s+(\d+)/.exec(output);
    const scanned = /Blocks scanned:\s+(\d+)/.exec(output);
    return { ok: r.exitCode === 0 && bad?.[1] === '0', method: 'pg_checksums', blocks: Number(scanned?.[1] ?? 0), output };
  }
  await c.stop();
  await c.start();
  try {
    await c.query('CREATE EXTENSION IF NOT EXISTS pg_prewarm', [], database);
    const [r] = await c.query<{ blocks: string }>(
      "SELECT sum(pg_prewarm(oid, 'buffer'))::text AS blocks FROM pg_class WHERE relkind IN ('r', 'i', 't', 'm') AND relpersistence = 'p'",
      [], database,
    );
    return { ok: true, method: 'read-all', blocks: Number(r!.blocks), output: '' };
  } catch (e) {
    return { ok: false, method: 'read-all', blocks: 0, output: (e as Error).message };
  } finally {
    await c.stop();
  }
}
