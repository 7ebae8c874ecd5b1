import { mkdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';
import { chownTo, PG15_CLIENT_BIN } from '../pg/version-lab.js';
import { PgCluster } from './pg-cluster.js';
import { createStreamingStandby, type StandbyOptions } from './pg-standby.js';

/**
 * Test helper: a streaming standby of `primary` on any version 10+.
 * `createStreamingStandby` covers 12+ (standby.signal); 10 and 11 know no
 * signal files and reject primary_conninfo in postgresql.auto.conf as an
 * unknown setting, so there the pg_basebackup copy gets a recovery.conf with
 * standby_mode = on instead (again not -R: the 15 client's conninfo carries
 * libpq options those walreceivers reject). Same contract otherwise: on
 * failure whatever was started is destroyed before the error is thrown.
 */
export async function createStandbyAnyVersion(o: StandbyOptions): Promise<PgCluster> {
  if (o.build.versionNum >= 120000) return createStreamingStandby(o);
  const conninfo = `host=127.0.0.1 port=${o.primary.port} user=postgres application_name=${o.applicationName ?? 'standby'}`;
  await mkdir(o.dataDir, { mode: 0o700 });
  await chownTo(o.dataDir);
  const { uid, gid } = await stat(o.dataDir);
  const r = await execa(path.join(PG15_CLIENT_BIN, 'pg_basebackup'), ['-D', o.dataDir, '-d', conninfo, '-X', 'stream', '-c', 'fast'], { uid, gid, cwd: '/', reject: false, stdin: 'ignore' });
  if (r.exitCode !== 0) throw new BlocksnapError('E_PG', `pg_basebackup into ${o.dataDir} failed: ${String(r.stderr)}`);
  const conf = path.join(o.dataDir, 'recovery.conf');
  await writeFile(conf, `standby_mode = 'on'\nprimary_conninfo = '${conninfo}'\n`, { mode: 0o600 });
  await chownTo(conf);
  const s = new PgCluster({ dataDir: o.dataDir, binDir: o.build.binDir, settings: o.settings });
  try {
    await s.start();
  } catch (e) {
    await s.destroy().catch(() => undefined);
    throw e;
  }
  return s;
}
