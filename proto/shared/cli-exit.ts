import { Command, CommanderError, InvalidArgumentError as InvalidArg } from 'commander';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlocksnapError, toBlocksnapError } from '../errors.js';

/**
 * Exit statuses shared by both CLIs (README "Exit status"). A wrapper can
 * tell "wrong invocation" (2) from "busy, try later" (75) from "failed" (1).
 * `blocksnap-agent audit` adds 3 (not audited) on its own.
 */
export const ExitStatus = {
  OK: 0,
  FAILED: 1,
  /** Usage or configuration error: fix the command line or the config file. */
  USAGE: 2,
  /** E_BUSY: already running / held by another process (sysexits EX_TEMPFAIL). */
  BUSY: 75,
  /** stdout's reader went away (EPIPE), as for SIGPIPE. */
  BROKEN_PIPE: 141,
} as const;

export function exitStatusOf(err: BlocksnapError): number {
  // E_IDENTITY: the config file names a device, image and mountpoint that are not one volume.
  if (err.code === 'E_USAGE' || err.code === 'E_CONFIG' || err.code === 'E_IDENTITY') return ExitStatus.USAGE;
  if (err.code === 'E_BUSY') return ExitStatus.BUSY;
  return ExitStatus.FAILED;
}

/**
 * Resolves once everything written so far to the stream reached the OS.
 * process.exit() does not wait for a pipe whose reader is slow: without this
 * the tail of the output is lost (issue 7 §6). A write's callback runs after
 * every earlier write was flushed; an error (EPIPE: the reader left) counts
 * as done, there is nobody left to write to.
 */
export function flushStream(s: NodeJS.WritableStream & { writableLength?: number; destroyed?: boolean }): Promise<void> {
  if (s.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      s.off('error', done);
      resolve();
    };
    s.once('error', done);
    try {
      s.write('', () => done());
    } catch {
      done();
    }
  });
}

/** Flushes stdout and stderr, then exits: the one way the CLIs end. */
export async function exitAfterFlush(status: number): Promise<never> {
  await Promise.all([flushStream(process.stdout), flushStream(process.stderr)]);
  process.exit(status);
}

/**
 * Runs a CLI's main and exits with its status after flushing. An error is
 * printed as `NAME: CODE: message` on stderr; commander's parse errors are
 * usage errors (exit 2); --help and --version exit 0.
 */
export function runCli(name: string, main: () => Promise<number>): void {
  // The reader of our stdout left (`| head`): stop quietly, as a Unix tool killed by SIGPIPE does (128 + 13).
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code !== 'EPIPE') throw e;
    void flushStream(process.stderr).then(() => process.exit(ExitStatus.BROKEN_PIPE));
  });
  main().then(
    (status) => exitAfterFlush(status),
    (e) => {
      if (e instanceof CommanderError) {
        // Help and version were printed by commander; a bare command group prints its help (exit 2).
        if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return exitAfterFlush(ExitStatus.OK);
        if (e.code === 'commander.help') return exitAfterFlush(e.exitCode === 0 ? ExitStatus.OK : ExitStatus.USAGE);
        e = new BlocksnapError('E_USAGE', `${e.message.replace(/^error: /, '').replace(/\s*\n\s*/g, ' ')} (see --help)`, { cause: e });
      }
      const err = toBlocksnapError(e);
      process.stderr.write(`${name}: ${err.code}: ${err.message}\n`);
      if (err.code === 'E_INTERNAL' && err.stack) process.stderr.write(`${(err.cause as Error | undefined)?.stack ?? err.stack}\n`);
      return exitAfterFlush(exitStatusOf(err));
    },
  );
}

/** An option parser for commander: an integer ≥ min, else a usage error naming the value. */
export function intOption(min: number, max = 2 ** 31 - 1): (v: string) => number {
  return (v: string) => {
    const n = Number(v);
    if (!/^-?\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw new InvalidArg(`wants an integer in ${min}..${max}`);
    }
    return n;
  };
}

/**
 * Both CLIs' commander program: --version, a --help on every command, the
 * one global option, `afterHelp` (exit statuses, signals). Errors are not
 * printed by commander but thrown (exitOverride) and ended by runCli as usage
 * errors (exit 2) naming the argument, with a suggestion for a misspelling.
 */
export function cliProgram(name: string, description: string, global: [flags: string, help: string], afterHelp: string): Command {
  return new Command(name)
    .description(description)
    .version(packageVersion(), '--version', 'print the version and exit')
    .helpOption('-h, --help', 'show help (every command has its own)')
    .option(...global)
    .exitOverride()
    .configureOutput({ outputError: () => undefined })
    .configureHelp({ showGlobalOptions: true })
    .showSuggestionAfterError(true)
    .addHelpText('after', afterHelp);
}

/** The version in the package.json above this file (source or dist/). */
export function packageVersion(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const f = join(d, 'package.json');
    if (existsSync(f)) return String(JSON.parse(readFileSync(f, 'utf8')).version);
    const up = dirname(d);
    if (up === d) return 'unknown';
    d = up;
  }
}

/**
 * Daemon signal policy (README "Signals"): resolves with the first SIGTERM or
 * SIGINT, for a graceful stop. SIGHUP is logged and ignored: its default
 * action would kill the process with no cleanup (snapshots, tracing
 * instances, dirty tracker state), and there is nothing to reload. A second
 * SIGTERM/SIGINT during the stop exits at once (status 1), logged.
 */
export function untilStopSignal(log: { info(o: object, m: string): void; warn(o: object, m: string): void }): Promise<NodeJS.Signals> {
  process.on('SIGHUP', () => log.warn({ signal: 'SIGHUP' }, 'SIGHUP ignored: nothing to reload (restart to apply a new configuration)'));
  return new Promise((resolve) => {
    let stopping = false;
    const onStop = (signal: NodeJS.Signals) => {
      if (!stopping) {
        stopping = true;
        log.info({ signal }, 'stop requested');
        resolve(signal);
        return;
      }
      log.warn({ signal }, 'second stop signal: exiting now, without finishing the cleanup');
      void exitAfterFlush(ExitStatus.FAILED);
    };
    process.on('SIGTERM', onStop);
    process.on('SIGINT', onStop);
  });
}
