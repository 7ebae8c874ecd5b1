#!/usr/bin/env node
import { Command } from 'commander';
import { cliProgram, runCli, untilStopSignal } from '../proto/shared/cli-exit.js';
import { BlocksnapError } from '../proto/errors.js';
import { addMountCommands } from './mount-cli.js';
import type { AuditResult } from './audit/audit-run.js';
import { agentSocketPath, callAgent, type AgentStatus } from './control-server.js';
import { controlRequest } from '../proto/shared/control-socket.js';
import type { RestoreResult } from './restore/restore-run.js';

/*
 * Start-up cost: only commander and the command definitions load up front;
 * each action imports what it needs (the configuration with the composition
 * registry, the agent, prepare, pino, the progress bar), so --help,
 * usage errors and `prepare` do not load the agent (tests spawn this CLI
 * often; loading everything cost ~0.6 s CPU per run).
 */
const createLogger = async (name: string) => (await import('../proto/shared/log.js')).createLogger(name);

const AFTER_HELP = `
Exit status: 0 success; 1 failure; 2 usage or configuration error (the message names the bad argument
or the config key); 3 audit only: not audited (says why); 75 busy (E_BUSY: another agent runs on the
state directory, or the volume is held by a job).
Signals (run): SIGTERM/SIGINT stop gracefully (running jobs are cancelled: snapshots released, tracing
instances removed, tracker state saved clean so the next incremental uses it; exit 0); SIGHUP is logged
and ignored (restart to apply a changed configuration). Logs are JSON on stderr (BLOCKSNAP_LOG=debug|info|warn).`;

interface Globals {
  config?: string;
  json?: boolean;
}

function program(setStatus: (s: number) => void): Command {
  const p = cliProgram('blocksnap-agent', 'tracks, snapshots and streams PostgreSQL volumes to a blocksnap appliance',
    ['--config <file>', 'agent configuration (JSON; see README "Agent configuration")'], AFTER_HELP);
  const run = <A extends unknown[]>(fn: (...a: A) => Promise<number> | number) => async (...a: A) => setStatus(await fn(...a));
  const globals = (cmd: Command) => cmd.optsWithGlobals<Globals>();
  const configOf = async (cmd: Command) => {
    const file = globals(cmd).config;
    if (!file) throw new BlocksnapError('E_USAGE', `${cmd.name()}: missing --config FILE (see --help)`);
    return (await import('./config.js')).loadAgentConfig(file);
  };

  p.command('run').description('connect to the appliance and run the jobs it sends (until SIGTERM/SIGINT)')
    .option('--insecure', 'allow plain ws:// to a non-loopback appliance (cleartext; same as "insecure": true in the config)')
    .action(run(async (o: { insecure?: boolean }, cmd: Command) => {
      const config = await configOf(cmd);
      if (o.insecure) config.insecure = true;
      const log = (await createLogger('blocksnap-agent')).child({ agent: config.agent });
      const stop = untilStopSignal(log); // before the start: a signal mid-start must not kill it half-way
      let fatal: BlocksnapError | null = null;
      let onFatal: () => void = () => undefined;
      const fatalSeen = new Promise<void>((res) => (onFatal = res));
      // The composition point: the config names the provider, tracker and quiescer (compose.ts).
      const { composeAgent, registry } = await import('./compose.js');
      const agent = await composeAgent(config, log, { registry, hooks: { onFatal: (e) => ((fatal = e), onFatal()) } });
      await agent.start();
      await Promise.race([stop, fatalSeen]);
      await agent.stop();
      if (fatal) throw fatal;
      log.info('stopped');
      return 0;
    }));
  p.command('cleanup').description('release snapshots, frozen filesystems and tracing instances an earlier (killed) run left')
    .option('--json', 'machine-readable output')
    .action(run(async (_o: unknown, cmd: Command) => {
      const config = await configOf(cmd);
      const log = (await createLogger('blocksnap-agent')).child({ agent: config.agent });
      const { agentPorts, registry, staleOfEveryTracker } = await import('./compose.js');
      const released = await (await agentPorts(config, log, registry)).provider.cleanupStale();
      // Every kind of tracker sweeps, not only the configured one: tracking may have been switched off since the crash.
      released.push(...await staleOfEveryTracker(config, log));
      process.stdout.write((globals(cmd).json ? JSON.stringify({ released }) : released.map((r) => `released ${r}`).join('\n') || 'nothing to release') + '\n');
      return 0;
    }));
  p.command('volumes').description('list the configured volumes and their last committed image')
    .option('--json', 'machine-readable output')
    .action(run(async (_o: unknown, cmd: Command) => {
      const config = await configOf(cmd);
      const { DigestMap, digestMapPath } = await import('./state/digest-map.js');
      const rows = [];
      for (const v of config.volumes) {
        const map = await DigestMap.readIfValid(digestMapPath(config.stateDir, v.name));
        rows.push({ ...v, lastImageId: map?.imageId ?? null });
      }
      process.stdout.write((globals(cmd).json ? JSON.stringify(rows, null, 2) : rows.map((r) => `${r.name}\t${r.device}\t${r.mountpoint}\t${r.lastImageId ?? '-'}`).join('\n')) + '\n');
      return 0;
    }));
  p.command('status').description('ask the running agent: connection, busy volumes, tracker validity')
    .option('--json', 'machine-readable output')
    .action(run(async (_o: unknown, cmd: Command) => {
      const config = await configOf(cmd);
      return printStatus(await callAgent<AgentStatus>(config.stateDir, 'GET', '/v1/status'), !!globals(cmd).json);
    }));
  p.command('audit <volume>')
    .description('ask the running agent to snapshot VOLUME and check its change tracker against a full comparison with the last ' +
      'committed image (no image is made; PostgreSQL is not quiesced). Exit 0: 0 missed chunks; 1: missed chunks (the tracker is ' +
      'then invalidated) or an error; 3: not audited (tracker invalid or not tracked, says why)')
    .option('--json', 'machine-readable output')
    .action(run(async (volume: string, _o: unknown, cmd: Command) => {
      const config = await configOf(cmd);
      return printAudit(await callAgent<AuditResult>(config.stateDir, 'POST', '/v1/audit', { volume }), !!globals(cmd).json);
    }));
  p.command('restore <image>')
    .description('ask the running agent to restore IMAGE (one of this agent\'s images) from the appliance onto a block device or ' +
      'a file: every chunk\'s SHA-256 checked against the image map, zero chunks written as holes. Refused (exit 2, nothing written): ' +
      'a mounted or held device, a target smaller than the image, a configured volume (except --changed-only of its own image), ' +
      'a volume\'s image file, a non-empty FILE without --force. A failed restore says what state the target is in')
    .requiredOption('--to <target>', 'a block device, or a FILE (written to a temp file beside it, renamed into place when complete)')
    .option('--changed-only', 'write only the chunks that differ between the image and the target now (the volume\'s change tracker when it ' +
      'is valid, else a digest comparison)')
    .option('--force', 'replace an existing non-empty FILE')
    .option('--json', 'machine-readable result: bytes written, chunks fetched, chunks skipped as unchanged, holes, seconds, MB/s')
    .action(run(async (image: string, o: { to: string; changedOnly?: boolean; force?: boolean }, cmd: Command) => {
      const config = await configOf(cmd);
      const { resolve } = await import('node:path');
      const bar = (await import('../proto/shared/progress.js')).progressBar(`restore ${image}`);
      let r: RestoreResult;
      try {
        r = await controlRequest<RestoreResult>(agentSocketPath(config.stateDir), 'POST', '/v1/restore',
          { image, target: resolve(o.to), changedOnly: !!o.changedOnly, force: !!o.force },
          {
            onEvent: (e) => { if (e.event === 'progress' && e.phase === 'write') bar.update(e.chunksDone, e.chunksTotal); },
            notRunning: (e) => new BlocksnapError('E_NOT_FOUND', `no agent running for state dir ${config.stateDir} (start it with: blocksnap-agent run)`, { cause: e }),
          });
      } finally {
        bar.stop();
      }
      const mib = (b: number) => (b / 2 ** 20).toFixed(1);
      process.stdout.write((globals(cmd).json ? JSON.stringify(r, null, 2) : `restored ${r.imageId} onto ${r.target}: ${r.chunksFetched} chunks fetched ` +
        `(${mib(r.bytesWritten)} MiB), ${r.holes} zero chunks as holes, ${r.chunksSkipped} unchanged chunks skipped (${r.changeSource}` +
        `${r.fallbackReason ? `: ${r.fallbackReason}` : ''}) in ${r.seconds.toFixed(1)} s, ${r.mbPerSecond.toFixed(0)} MB/s`) + '\n');
      return 0;
    }));
  addMountCommands(p, { run, configOf, json: (cmd) => !!globals(cmd).json });
  p.command('prepare <datadir>')
    .description('make the data directory of a mounted exported image startable: backup_label and tablespace_map from the image, ' +
      'its WAL up to the stop LSN, recovery settings (no --config needed)')
    .requiredOption('--image <file>', 'the exported image file (its FILE.blocksnap.json and FILE.wal/ beside it)')
    .option('--as-standby', 'start as a standby (with --primary-conninfo)')
    .option('--primary-conninfo <conninfo>', 'the primary a standby streams from')
    .option('--restore-command <cmd>', 'restore_command for WAL beyond the image')
    .option('--port <port>', 'the copy\'s port (postgresql.auto.conf), to run it beside the source', (v: string) => {
      if (!/^\d{1,5}$/.test(v) || Number(v) < 1 || Number(v) > 65535) throw new BlocksnapError('E_USAGE', `--port: not a port: ${v}`);
      return Number(v);
    })
    .option('--json', 'machine-readable output')
    .action(run(async (dir: string, o: { image: string; asStandby?: boolean; primaryConninfo?: string; restoreCommand?: string; port?: number }, cmd: Command) => {
      const { prepareFromExport } = await import('./pg/prepare-from-export.js');
      const r = await prepareFromExport(dir, o.image, { asStandby: o.asStandby, primaryConninfo: o.primaryConninfo, restoreCommand: o.restoreCommand, port: o.port });
      process.stdout.write((globals(cmd).json ? JSON.stringify(r, null, 2) : `prepared ${dir} from image ${r.imageId}: wrote ${r.written.join(', ')}; WAL ${r.walCopied.length} segment(s)`) + '\n');
      return 0;
    }));
  return p;
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

runCli('blocksnap-agent', async () => {
  let status = 0;
  await program((s) => (status = s)).parseAsync(process.argv);
  return status;
});
