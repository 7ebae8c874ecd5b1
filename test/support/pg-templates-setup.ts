/**
 * vitest globalSetup: one directory for the lab's PostgreSQL template data
 * directories (scripts/lab/pg-cluster.ts, `PG_TEMPLATES_ENV`) for the length
 * of one test run. The workers inherit its path through the environment; the
 * teardown removes it, and a ledger entry lets `npm run cleanup` remove it
 * after a run that was killed before its teardown. Outside a test run the
 * variable is unset and every cluster runs its own initdb.
 */
import { chmod, mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { releaseResources } from '../../scripts/lab/cleanup.js';
import { Ledger } from '../../scripts/lab/ledger.js';
import { PG_TEMPLATES_ENV } from '../../scripts/lab/pg-cluster.js';

export default async function setup(): Promise<() => Promise<void>> {
  const ledger = await Ledger.create('pg-templates');
  const dir = await mkdtemp(path.join(os.tmpdir(), 'blocksnap-pg-templates-'));
  await ledger.add({ kind: 'dir', path: dir });
  // initdb runs as the clusters' OS user (postgres) into a staging folder here.
  await chmod(dir, 0o755);
  process.env[PG_TEMPLATES_ENV] = dir;
  return async () => {
    const actions = await releaseResources(ledger.path, ledger.resources);
    const failed = actions.filter((a) => a.outcome === 'failed' || a.outcome === 'skipped');
    if (failed.length) throw new Error(`pg templates ${dir}: cannot remove: ${failed.map((a) => a.detail).join('; ')}`);
    await ledger.delete();
  };
}
