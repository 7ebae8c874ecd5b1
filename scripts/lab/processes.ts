import { execa } from 'execa';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, closeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

/**
 * The real CLIs as child processes, for the demo, the benchmark and the
 * crash tests (kill -9 needs a process of its own). They run the compiled
 * code in dist/ (`npm run build`). Each runs in its own session (setsid) so
 * a terminal's SIGHUP cannot wedge it, and is stopped by PID only.
 */
export function repoRoot(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(d, 'package.json'))) {
    const up = dirname(d);
    if (up === d) throw new Error('package.json not found above ' + fileURLToPath(import.meta.url));
    d = up;
  }
  return d;
}

export const applianceCli = () => join(repoRoot(), 'dist', 'appliance', 'cli.js');
export const agentCli = () => join(repoRoot(), 'dist', 'agent', 'cli.js');

export interface Daemon {
  pid: number;
  child: ChildProcess;
  /** SIGTERM and wait for exit (SIGKILL after the grace period). */
  stop(graceMs?: number): Promise<number | null>;
  /** kill -9 and wait for exit. */
  kill9(): Promise<void>;
  exited: Promise<number | null>;
}

function daemon(cmd: string, args: string[], logFile: string, env: NodeJS.ProcessEnv = {}): Daemon {
  const log = openSync(logFile, 'a');
  const child = spawn(process.execPath, [cmd, ...args], {
    detached: true, stdio: ['ignore', 'pipe', log], env: { ...process.env, ...env },
  });
  closeSync(log);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const d: Daemon = {
    pid: child.pid!,
    child,
    exited,
    async stop(graceMs = 15_000) {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
      const code = await exited;
      clearTimeout(t);
      return code;
    },
    async kill9() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGKILL');
      await exited;
    },
  };
  return d;
}

export interface ApplianceProcess extends Daemon {
  url: string;
  port: number;
}

/** `blocksnap-appliance serve` on 127.0.0.1 (port 0 = any free port); resolves when it listens. */
export async function spawnAppliance(
  dataDir: string,
  opts: { port?: number; logFile?: string; env?: NodeJS.ProcessEnv; args?: string[] } = {},
): Promise<ApplianceProcess> {
  // A fixed port (a restart on the port the agents dial) would put NBD on that port + 1, which may be
  // another process's: any free one instead, unless the caller chose.
  const nbd = opts.port && !opts.args?.includes('--nbd-listen') ? ['--nbd-listen', '127.0.0.1:0'] : [];
  const d = daemon(applianceCli(), ['serve', '--data', dataDir, '--listen', `127.0.0.1:${opts.port ?? 0}`, ...nbd, ...(opts.args ?? [])],
    opts.logFile ?? join(dataDir, '..', 'appliance.log'), opts.env);
  const rl = createInterface({ input: d.child.stdout! });
  const first = await new Promise<string>((resolve, reject) => {
    rl.once('line', resolve);
    d.exited.then((code) => reject(new Error(`appliance exited (${code}) before listening; see its log`)));
  });
  const ev = JSON.parse(first);
  return { ...d, url: ev.url, port: ev.port };
}

/** `blocksnap-agent run --config FILE`. */
export function spawnAgent(configFile: string, logFile: string, env?: NodeJS.ProcessEnv): Daemon {
  return daemon(agentCli(), ['run', '--config', configFile], logFile, env);
}

/** Runs `blocksnap-appliance ARGS --data DIR` and returns stdout (parsed when --json). */
export async function applianceCmd(dataDir: string, args: string[]): Promise<{ exitCode: number; stdout: string; stderr: string; json?: any }> {
  const r = await execa(process.execPath, [applianceCli(), ...args, '--data', dataDir], { reject: false, stdin: 'ignore' });
  let json;
  if (args.includes('--json') && r.stdout) {
    try {
      json = JSON.parse(r.stdout);
    } catch {
      json = undefined;
    }
  }
  return { exitCode: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr), json };
}
