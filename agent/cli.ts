#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { BlocksnapError, toBlocksnapError } from '../proto/errors.js';
import { createLogger } from '../proto/log.js';
import { Agent } from './agent.js';
import { loadAgentConfig } from './config.js';
import { prepareFromExport } from './pg/prepare-from-export.js';
import { ReflinkSnapshotProvider } from './snapshot/reflink-snapshot-provider.js';
import { RetainingSnapshotProvider } from './snapshot/retaining-provider.js';
import { cleanupStaleInstances } from './tracker/tracefs-instance.js';
import type { AuditResult } from './audit-run.js';
import { callAgent, type AgentStatus } from './control-server.js';

const HELP = `blocksnap-agent — tracks, snapshots and streams PostgreSQL volumes to a blocksnap appliance

Usage: blocksnap-agent <command> [--config FILE] [options]

Commands:
  run        connect to the appliance and run the jobs it sends (until SIGINT/SIGTERM)
  cleanup    release snapshots, frozen filesystems and tracing instances an earlier (killed) run left
  volumes    list the configured volumes and their last committed image [--json]
  status     ask the running agent: connection, busy volumes, tracker validity [--json]
  audit VOLUME
             ask the running agent to snapshot VOLUME and check its change tracker against a
             full comparison with the last committed image (no image is made; PostgreSQL is not
             quiesced). Exit 0: 0 missed chunks; 1: missed chunks (the tracker is then
             invalidated) or an error; 3: not audited (tracker invalid or not tracked, says why)
  prepare DATADIR --image FILE [--as-standby --primary-conninfo CONNINFO] [--restore-command CMD]
             make the data directory of a mounted exported image startable: backup_label and
             tablespace_map from the image, its WAL up to the stop LSN, recovery settings
             (no --config needed)

Options:
  --config FILE   agent configuration (JSON; see README "Agent configuration")
  --json          machine-readable output
  --help          show this help

Logs are JSON on stderr (level: BLOCKSNAP_LOG=debug|info|warn).`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' }, image: { type: 'string' },
      'as-standby': { type: 'boolean' }, 'primary-conninfo': { type: 'string' }, 'restore-command': { type: 'string' },
    },
  });
  const cmd = positionals[0];
  if (values.help || !cmd) {
    process.stdout.write(HELP + '\n');
    return values.help ? 0 : 2;
  }
  if (cmd === 'prepare') {
    const dir = positionals[1];
    if (!dir || !values.image) throw new BlocksnapError('E_USAGE', 'prepare DATADIR --image FILE (see --help)');
    const r = await prepareFromExport(dir, values.image, {
      asStandby: values['as-standby'], primaryConninfo: values['primary-conninfo'], restoreCommand: values['restore-command'],
    });
    process.stdout.write((values.json ? JSON.stringify(r, null, 2) : `prepared ${dir} from image ${r.imageId}: wrote ${r.written.join(', ')}; WAL ${r.walCopied.length} segment(s)`) + '\n');
    return 0;
  }
  if (!values.config) throw new BlocksnapError('E_USAGE', 'missing --config FILE (see --help)');
  const config = loadAgentConfig(values.config);
  if (cmd === 'status') return printStatus(await callAgent<AgentStatus>(config.stateDir, 'GET', '/v1/status'), !!values.json);
  if (cmd === 'audit') {
    const volume = positionals[1];
    if (!volume) throw new BlocksnapError('E_USAGE', 'audit VOLUME --config FILE (see --help)');
    return printAudit(await callAgent<AuditResult>(config.stateDir, 'POST', '/v1/audit', { volume }), !!values.json);
  }
  const log = createLogger('blocksnap-agent').child({ agent: config.agent });
  const reflink = new ReflinkSnapshotProvider({ stateDir: config.stateDir, logger: log, volumes: config.volumes });
  const provider = config.retainSnapshotsDir ? new RetainingSnapshotProvider(reflink, config.retainSnapshotsDir) : reflink;
  switch (cmd) {
    case 'run': {
      let fatal: BlocksnapError | null = null;
      let stopNow: () => void = () => undefined;
      const stopped = new Promise<void>((res) => (stopNow = res));
      const agent = new Agent(config, provider, log, { onFatal: (e) => ((fatal = e), stopNow()) });
      await agent.start();
      process.once('SIGINT', stopNow);
      process.once('SIGTERM', stopNow);
      await stopped;
      await agent.stop();
      if (fatal) throw fatal;
      return 0;
    }
    case 'cleanup': {
      const released = await provider.cleanupStale();
      released.push(...(await cleanupStaleInstances()).map((i) => `tracing instance ${i}`));
      process.stdout.write((values.json ? JSON.stringify({ released }) : released.map((r) => `released ${r}`).join('\n') || 'nothing to release') + '\n');
      return 0;
    }
    case 'volumes': {
      const { DigestMap } = await import('./state/digest-map.js');
      const { digestMapPath } = await import('./job-runner.js');
      const rows = [];
      for (const v of config.volumes) {
        const map = await DigestMap.readIfValid(digestMapPath(config.stateDir, v.name));
        rows.push({ ...v, lastImageId: map?.imageId ?? null });
      }
      process.stdout.write((values.json ? JSON.stringify(rows, null, 2) : rows.map((r) => `${r.name}\t${r.device}\t${r.mountpoint}\t${r.lastImageId ?? '-'}`).join('\n')) + '\n');
      return 0;
    }
    default:
      throw new BlocksnapError('E_USAGE', `unknown command ${cmd} (see --help)`);
  }
}

function printStatus(s: AgentStatus, json: boolean): number {
  if (json) {
    process.stdout.write(JSON.stringify(s, null, 2) + '\n');
    return 0;
  }
  const lines = [`agent ${s.agent} (pid ${s.pid}, ${s.version}): ${s.connected ? 'connected to the appliance' : 'NOT connected to the appliance'}; tracking ${s.trackingMode}`];
  for (const v of s.volumes) {
    const t = v.tracking;
    const tracker = !t ? 'not tracked' : t.validity.valid ? `tracker valid (generation ${t.generation}, basis ${t.basisImageId ?? 'none'})` : `tracker INVALID: ${t.validity.reason}`;
    lines.push(`${v.name}\t${v.device}\t${v.mountpoint}\t${tracker}${v.busy ? `\tbusy: ${v.busy}` : ''}`);
  }
  process.stdout.write(lines.join('\n') + '\n');
  return 0;
}

function printAudit(r: AuditResult, json: boolean): number {
  const code = !r.valid ? 3 : r.missed > 0 ? 1 : 0;
  if (json) {
    process.stdout.write(JSON.stringify(r, null, 2) + '\n');
    return code;
  }
  let text: string;
  if (!r.valid) text = `${r.volume}: not audited: ${r.reason}`;
  else {
    const facts = `${r.changed} changed, ${r.tracked} tracked (${r.extra} extra) since ${r.basisImageId}; read ${(r.bytesRead / 2 ** 20).toFixed(1)} MiB in ${r.seconds.toFixed(1)} s`;
    text = r.missed === 0
      ? `${r.volume}: audit passed: 0 missed; ${facts}`
      : `${r.volume}: AUDIT FAILED: ${r.missed} changed chunks were not tracked (first: ${r.missedSample.join(', ')}); ${facts}. ` +
        'The tracker was invalidated: the next incremental compares digests.';
  }
  process.stdout.write(text + '\n');
  return code;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    const err = toBlocksnapError(e);
    process.stderr.write(`blocksnap-agent: ${err.code}: ${err.message}\n`);
    process.exit(err.code === 'E_USAGE' ? 2 : 1);
  },
);
