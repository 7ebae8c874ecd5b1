import { execa } from 'execa';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Catalog } from '../../appliance/catalog/catalog.js';
import { agentCli, applianceCli, applianceCmd, repoRoot, spawnAppliance } from '../../scripts/lab/processes.js';

/**
 * How the compiled CLIs (dist/: `npm run build`) end: usage errors exit 2
 * naming the bad argument, --version and per-command --help, a busy port,
 * and stdout delivered whole to a slow pipe reader before the exit.
 */
const version = JSON.parse(readFileSync(join(repoRoot(), 'package.json'), 'utf8')).version as string;

async function cli(bin: string, args: string[]): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  const r = await execa(process.execPath, [bin, ...args], { reject: false, stdin: 'ignore', timeout: 30_000 });
  return { exitCode: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
}

describe('CLI exits', () => {
  let root: string;
  let dataDir: string;

  beforeAll(async () => {
    expect(existsSync(applianceCli()), 'run npm run build first').toBe(true);
    root = await mkdtemp(join(tmpdir(), 'bsn-cli-exit-'));
    dataDir = join(root, 'data');
    await mkdir(dataDir);
    // A catalog whose `images list --json` is ~300 KB: several pipe buffers.
    const c = Catalog.open(join(dataDir, 'catalog.sqlite'));
    try {
      c.addAgent('db1');
      for (let i = 0; i < 600; i++) {
        c.insertImage({
          id: `img-${String(i).padStart(6, '0')}`, agent: 'db1', volume: 'pgdata', jobId: null, kind: 'full', basisImageId: null,
          rootDigest: 'ab'.repeat(32), volumeSize: 1 << 30, chunkSize: 65536, createdAt: new Date(0).toISOString(),
          stats: { chunksTotal: 16384, chunksSent: i, changeSource: 'full', fallbackReason: '', note: 'x'.repeat(200) },
        });
      }
    } finally {
      c.close();
    }
  });

  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('images list --json piped into a slow reader delivers every byte, then exits 0', async () => {
    const whole = await applianceCmd(dataDir, ['images', 'list', '--json']);
    expect(whole.exitCode, whole.stderr).toBe(0);
    const expected = Buffer.byteLength(whole.stdout) + 1; // execa strips the final newline
    expect(expected).toBeGreaterThan(4 * 65536);
    // The reader pauses after every read, so the pipe is full when the CLI is done writing.
    const reader = join(root, 'slow-reader.cjs');
    await writeFile(reader, `let n = 0;
process.stdin.on('data', (c) => { n += c.length; process.stdin.pause(); setTimeout(() => process.stdin.resume(), 10); });
process.stdin.on('end', () => process.stdout.write(String(n)));`);
    const r = await execa('bash', ['-c', `"${process.execPath}" "${applianceCli()}" images list --json --data "${dataDir}" | "${process.execPath}" "${reader}"; echo " \${PIPESTATUS[0]}"`],
      { reject: false, timeout: 120_000 });
    const [bytes, status] = String(r.stdout).trim().split(/\s+/);
    expect(Number(bytes)).toBe(expected);
    expect(status).toBe('0');
  });

  it('a reader that leaves early (| head) ends the CLI quietly with 141, as SIGPIPE would, not an EPIPE stack trace', async () => {
    const r = await execa('bash', ['-c', `"${process.execPath}" "${applianceCli()}" images list --json --data "${dataDir}" | head -c 100 >/dev/null; echo "\${PIPESTATUS[0]}"`],
      { reject: false, timeout: 60_000 });
    expect(String(r.stdout).trim()).toBe('141');
    expect(String(r.stderr)).toBe('');
  });

  it.each([
    [['images', 'list', '--jsno'], /--jsno/],
    [['jobs', 'list', '--limit', 'abc'], /--limit.*'abc'/],
    [['serve', '--listen', '127.0.0.1:99999'], /--listen.*'127\.0\.0\.1:99999'/],
    [['serve', '--listen', 'nocolon'], /--listen.*'nocolon'/],
    [['serve', '--tls-cert', '/nonexist', '--tls-key', '/nonexist'], /--tls-cert \/nonexist: cannot read/],
    [['serve', '--tls-cert', '/nonexist'], /--tls-cert and --tls-key go together/],
    [['serve', '--tls-cert', '/proc/version', '--tls-key', '/proc/version'], /--tls-cert \/proc\/version \/ --tls-key \/proc\/version: not a usable certificate and key/],
    [['serve', '--audit-every', '-1'], /--audit-every.*'-1'/],
    [['agents', 'add', 'db2', '--data', '/nonexist'], /--data \/nonexist: no such directory .*serve --data/],
    [['images', 'show'], /missing required argument 'image'/],
    [['images', 'list', 'extra'], /too many arguments/],
    [['export', 'img-1'], /--to <file>/],
    [['frobnicate'], /unknown command 'frobnicate'/],
  ])('appliance %j: usage error, exit 2, names the argument', async (args, why) => {
    const r = await cli(applianceCli(), [...args, ...(args.includes('--data') ? [] : ['--data', dataDir])]);
    expect(r.exitCode, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/^blocksnap-appliance: E_USAGE: /);
    expect(r.stderr).toMatch(why);
    expect(r.stderr).not.toMatch(/E_INTERNAL|\n\s+at /);
  });

  it.each([
    [['run'], /missing --config/],
    [['status', '--config', '/nonexist.json'], /E_CONFIG: cannot read agent config \/nonexist\.json/],
    [['volumes', '--jsno'], /--jsno/],
    [['audit'], /missing required argument 'volume'/],
    [['prepare', '/tmp/x'], /--image <file>/],
  ])('agent %j: usage or config error, exit 2', async (args, why) => {
    const r = await cli(agentCli(), args);
    expect(r.exitCode, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/^blocksnap-agent: E_(USAGE|CONFIG): /);
    expect(r.stderr).toMatch(why);
  });

  it('--version prints package.json\'s version; every command has its own --help', async () => {
    for (const bin of [applianceCli(), agentCli()]) {
      const v = await cli(bin, ['--version']);
      expect(v.exitCode).toBe(0);
      expect(v.stdout.trim()).toBe(version);
    }
    const appliance = ['serve', 'agents add', 'agents rotate', 'agents list', 'images list', 'images show', 'jobs list', 'jobs cancel',
      'backup', 'verify', 'export', 'catalog rebuild', 'store reindex'];
    for (const sub of appliance) {
      const h = await cli(applianceCli(), [...sub.split(' '), '--help']);
      expect(h.exitCode, sub).toBe(0);
      expect(h.stdout, sub).toMatch(new RegExp(`^Usage: blocksnap-appliance ${sub}`));
      expect(h.stdout, sub).toMatch(/--data <dir>/); // the global option is shown
    }
    for (const sub of ['run', 'cleanup', 'volumes', 'status', 'audit', 'prepare']) {
      const h = await cli(agentCli(), [sub, '--help']);
      expect(h.exitCode, sub).toBe(0);
      expect(h.stdout, sub).toMatch(new RegExp(`^Usage: blocksnap-agent ${sub}`));
    }
    const top = await cli(applianceCli(), ['--help']);
    expect(top.stdout).toMatch(/75 busy/);
  });

  it('serve on a busy port: E_BUSY, exit 75, no stack trace, and nothing left claiming the data directory', async () => {
    const busyDir = join(root, 'busy');
    const blocker: Server = createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r));
    const port = (blocker.address() as { port: number }).port;
    try {
      const r = await cli(applianceCli(), ['serve', '--data', busyDir, '--listen', `127.0.0.1:${port}`]);
      expect(r.exitCode, r.stderr).toBe(75);
      expect(r.stderr).toMatch(new RegExp(`E_BUSY: --listen 127\\.0\\.0\\.1:${port}: address already in use`));
      expect(r.stderr).not.toMatch(/Unhandled|\n\s+at /);
    } finally {
      await new Promise<void>((r) => blocker.close(() => r()));
    }
    expect((await readdir(busyDir)).filter((f) => /\.pid$|\.sock$/.test(f))).toEqual([]);
    // The data directory is free: an appliance starts on it at once.
    const app = await spawnAppliance(busyDir, { logFile: join(root, 'busy.log') });
    expect(await app.stop()).toBe(0);
  });
});
