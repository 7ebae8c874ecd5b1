import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';
import type { PgbenchResult, PgCluster } from './pg-cluster.js';

/**
 * pgbench for a fixed wall time (`-T`) instead of a transaction count: a
 * test that must act while the workload is surely still running (kill -9 of
 * the agent in the middle of it) cannot rely on how fast a shared machine
 * happens to be.
 */
export async function pgbenchTimed(pg: PgCluster, opts: { seconds: number; clients: number }): Promise<PgbenchResult> {
  const args = ['-h', '127.0.0.1', '-p', String(pg.port), '-U', 'postgres', '-n', '-T', String(opts.seconds),
    '-c', String(opts.clients), '-j', String(Math.min(opts.clients, 2)), 'postgres'];
  const r = await execa(path.join(pg.clientBinDir, 'pgbench'), args, {
    reject: false, stdin: 'ignore', timeout: (opts.seconds + 120) * 1000, extendEnv: false,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C' },
  });
  const output = `${String(r.stdout)}\n${String(r.stderr)}`;
  const tps = /tps = ([\d.]+)/.exec(output);
  const done = /number of transactions actually processed: (\d+)/.exec(output);
  if (r.exitCode !== 0 || !tps || !done) throw new BlocksnapError('E_PG', `pgbench -T ${opts.seconds} failed:\n${output}`, { cause: r });
  return { tps: Number(tps[1]), transactions: Number(done[1]), output };
}
