/**
 * Releases what killed test runs left behind (loop devices, mounts,
 * postmasters, temp dirs recorded in ledgers) and, with --state-dir, an
 * agent's leftover reflink snapshots and freeze markers (run that only while
 * the agent is stopped).
 *
 *   node dist/scripts/cleanup.js [--dry-run] [--ledger-dir DIR] [--state-dir DIR] [--json] [--help]
 *
 * Exit code 0 if everything was released (or would be), 1 if something could
 * not be, 2 on bad usage.
 */
import { parseArgs } from 'node:util';
import { toBlocksnapError } from '../proto/errors.js';
import { createLogger } from '../proto/shared/log.js';
import { ReflinkSnapshotProvider } from '../agent/snapshot/reflink-snapshot-provider.js';
import { cleanupLeftovers, type CleanupAction } from './lab/cleanup.js';
import { defaultLedgerDir } from './lab/ledger.js';
import { cleanupStaleInstances, listInstances, parseInstanceName, tracefsRoot } from '../agent/cbt/tracefs/tracefs-instance.js';
import { isAlive } from '../proto/shared/proc.js';

const HELP = `Usage: cleanup [--dry-run] [--ledger-dir DIR] [--state-dir DIR] [--json]

Releases resources recorded by test runs whose process is gone: stops their
postmasters (by PID), unmounts their mounts, detaches their loop devices and
removes their temp directories, and removes blocksnap tracing instances
whose owning process is gone. Resources of live runs are never touched.

  --dry-run         only report what would be released
  --ledger-dir DIR  where test ledgers are (default ${defaultLedgerDir()})
  --state-dir DIR   also thaw filesystems named by leftover freeze markers and
                    remove the leftover snapshots of this agent state directory
                    (only while that agent is stopped)
  --json            print the report as JSON
  --help            show this help
`;

async function main(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        'dry-run': { type: 'boolean', default: false },
        'ledger-dir': { type: 'string' },
        'state-dir': { type: 'string' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', default: false },
      },
      strict: true,
    }));
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const dryRun = values['dry-run'];
  const logger = createLogger('cleanup');
  const report = await cleanupLeftovers({ dryRun, ledgerDir: values['ledger-dir'], logger });
  const snapshots: string[] = [];
  let failures = report.failures;
  if (values['state-dir']) {
    const provider = new ReflinkSnapshotProvider({ stateDir: values['state-dir'], logger });
    try {
      if (dryRun) {
        const stale = await provider.inspectStale();
        snapshots.push(
          ...stale.frozen.map((f) => `would-thaw:${f.marker.mountpoint}`),
          ...stale.temps.map((t) => `would-remove:${t}`),
          ...stale.snapshots.map((s) => `would-remove:${s.path}`),
        );
      } else {
        snapshots.push(...(await provider.cleanupStale(new Set())));
      }
    } catch (e) {
      failures++;
      snapshots.push(`failed:${toBlocksnapError(e).message}`);
    }
  }
  // Tracing instances of dead agents (or killed tests): names carry the owner's pid and start time.
  const instances: string[] = [];
  try {
    const root = await tracefsRoot({ mount: false }).catch(() => null);
    if (root && dryRun) {
      for (const name of await listInstances(root)) {
        const owner = parseInstanceName(name)!;
        if (!(await isAlive(owner.pid, owner.startTime))) instances.push(`would-remove:${name}`);
      }
    } else if (root) {
      instances.push(...(await cleanupStaleInstances({ root })).map((n) => `removed:${n}`));
    }
  } catch (e) {
    failures++;
    instances.push(`failed:${toBlocksnapError(e).message}`);
  }
  if (values.json) {
    process.stdout.write(JSON.stringify({ dryRun, ...report, snapshots, instances, failures }, null, 2) + '\n');
  } else {
    const line = (a: CleanupAction) => `${a.outcome.padEnd(13)} ${a.kind.padEnd(10)} ${a.target}${a.detail ? `  (${a.detail})` : ''}`;
    for (const a of report.actions) process.stdout.write(line(a) + '\n');
    for (const l of report.live) process.stdout.write(`live          ledger     ${l.ledger} (pid ${l.pid})\n`);
    for (const s of snapshots) process.stdout.write(`snapshot      ${s}\n`);
    for (const i of instances) process.stdout.write(`tracing       ${i}\n`);
    if (!report.actions.length && !snapshots.length && !instances.length) process.stdout.write('nothing to clean up\n');
  }
  return failures ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`cleanup failed: ${toBlocksnapError(e).message}\n`);
    process.exitCode = 1;
  },
);
