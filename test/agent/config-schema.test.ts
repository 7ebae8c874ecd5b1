import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadAgentConfig, parseAgentConfig } from '../../agent/config.js';
import { isBlocksnapError } from '../../proto/errors.js';

/**
 * The agent configuration schema (agent/config.ts, zod): strict objects, every
 * problem named by its path, and every field and default of the landed format.
 */
const base = {
  appliance: 'ws://127.0.0.1:7700/v1/agent', agent: 'db1', token: 't', stateDir: '/var/lib/blocksnap',
  volumes: [{ name: 'pgdata', device: '/dev/loop3', image: '/pool/pgdata.img', mountpoint: '/srv/pg' }],
};

function problems(raw: unknown, source = 'config.json'): string[] {
  try {
    parseAgentConfig(raw, source);
  } catch (e) {
    expect(isBlocksnapError(e, 'E_CONFIG'), String(e)).toBe(true);
    return (e as Error).message.split('\n');
  }
  throw new Error('accepted');
}

describe('agent config schema', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'bsn-config-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('refuses unknown keys at every level, naming each by its path', () => {
    expect(problems({ ...base, volumez: [] })).toEqual(['config.json: volumez: unrecognized key']);
    expect(problems({ ...base, postgres: { prot: 5432 } })).toEqual(['config.json: postgres.prot: unrecognized key']);
    expect(problems({ ...base, volumes: [{ ...base.volumes[0], chunksize: 4096 }] })).toEqual(['config.json: volumes[0].chunksize: unrecognized key']);
    expect(problems({ ...base, groups: [{ name: 'g', volumes: ['pgdata'], extra: 1 }] })).toEqual(['config.json: groups[0].extra: unrecognized key']);
  });

  it('reports every problem at once, not the first one', () => {
    const p = problems({ ...base, volumez: 1, workers: 0, postgres: { prot: 1, port: 70000 }, volumes: [{ ...base.volumes[0], chunkSize: 5000 }] });
    expect(p).toEqual(expect.arrayContaining([
      'config.json: volumez: unrecognized key',
      'config.json: workers: must be an integer ≥ 1',
      'config.json: postgres.prot: unrecognized key',
      'config.json: postgres.port: must be an integer in 1..65535',
    ]));
    expect(p.some((l) => /^config\.json: volumes\[0\]\.chunkSize: /.test(l))).toBe(true);
    expect(p).toHaveLength(5);
  });

  it('names missing and mistyped fields', () => {
    const { stateDir: _s, ...noState } = base;
    expect(problems(noState)).toEqual(['config.json: stateDir: must be an absolute path']);
    expect(problems({ ...base, appliance: 'http://x' })).toEqual(['config.json: appliance: must be a ws:// or wss:// URL']);
    expect(problems({ ...base, tracking: 'ebpf' })).toEqual(['config.json: tracking: must be "tracefs", "thin-delta", "dm-era" or "off"']);
    // provider, tracking and quiescer name entries of the composition registry (agent/compose.ts)
    expect(problems({ ...base, provider: 'lvm', quiescer: 'mysql' })).toEqual(['config.json: provider: must be "reflink", "lvm-classic" or "lvm-thin"', 'config.json: quiescer: must be "postgres"']);
    expect(problems({ ...base, quiescer: 'postgres' })).toEqual(['config.json: quiescer: "postgres" needs the "postgres" section']);
    expect(parseAgentConfig({ ...base, provider: 'reflink', tracking: 'off', quiescer: 'postgres', postgres: {} })).toMatchObject({ provider: 'reflink', quiescer: 'postgres' });
    const known = { providers: ['reflink', 'fake'], trackers: ['tracefs', 'off', 'memory'], quiescers: [] };
    expect(parseAgentConfig({ ...base, provider: 'fake', tracking: 'memory' }, 'config.json', known)).toMatchObject({ provider: 'fake', tracking: 'memory' });
    expect(problems({ ...base, postgres: { fast: 'yes' } })).toEqual(['config.json: postgres.fast: must be true or false']);
    const { token: _t, ...noToken } = base;
    expect(problems(noToken)).toEqual(['config.json: "token" or "tokenFile" is required']);
    expect(problems([])).toEqual(['config.json: not a JSON object']);
  });

  it('keeps every default of the landed format', () => {
    const c = parseAgentConfig(base);
    expect(c).toEqual({
      appliance: base.appliance, insecure: false, agent: 'db1', token: 't', stateDir: '/var/lib/blocksnap',
      volumes: [{ name: 'pgdata', device: '/dev/loop3', image: '/pool/pgdata.img', mountpoint: '/srv/pg', chunkSize: 65536 }],
      groups: [], windowBytes: 32 << 20, batchBytes: 2 << 20, workers: 2, compressionLevel: 1, reconnectMaxMs: 10_000,
      retainSnapshotsDir: undefined, provider: 'reflink', tracking: 'tracefs',
    });
    expect(parseAgentConfig({ ...base, postgres: {} }).postgres).toEqual({
      host: '127.0.0.1', port: 5432, user: 'postgres', database: 'postgres', role: 'auto', fast: true, pauseTimeoutMs: 30_000, watchdogSeconds: 600,
    });
  });

  it('accepts every field of the landed format', async () => {
    const tokenFile = join(dir, 'token');
    const caFile = join(dir, 'ca.pem');
    await writeFile(tokenFile, 'secret\n');
    await writeFile(caFile, 'PEM');
    const file = join(dir, 'agent.json');
    await writeFile(file, JSON.stringify({
      appliance: 'wss://a:1/v1/agent', agent: 'db-1.x', tokenFile, caFile, stateDir: '/s',
      volumes: [{ name: 'a', device: '/dev/a', mountpoint: '/a', chunkSize: 4096 }, { name: 'b', device: '/dev/b', mountpoint: '/b' }],
      groups: [{ name: 'ab', volumes: ['a', 'b'] }], windowBytes: 1 << 20, batchBytes: 64 << 10, workers: 4, compressionLevel: -3,
      reconnectMaxMs: 100, tracking: 'off', trackerBufferKb: 64, retainSnapshotsDir: '/keep',
      postgres: { host: 'h', port: 5433, user: 'u', password: 'p', database: 'd', role: 'standby', fast: false, dataDirectory: '/pg', pauseTimeoutMs: 100, watchdogSeconds: 5 },
    }));
    const c = loadAgentConfig(file);
    expect(c.token).toBe('secret');
    expect(c.ca?.toString()).toBe('PEM');
    expect(c.groups).toEqual([{ name: 'ab', volumes: ['a', 'b'] }]);
    expect(c.volumes.map((v) => v.chunkSize)).toEqual([4096, 65536]);
    expect(c).toMatchObject({ workers: 4, compressionLevel: -3, tracking: 'off', trackerBufferKb: 64, retainSnapshotsDir: '/keep' });
    expect(c.postgres).toEqual({ host: 'h', port: 5433, user: 'u', password: 'p', database: 'd', role: 'standby', fast: false, dataDirectory: '/pg', pauseTimeoutMs: 100, watchdogSeconds: 5 });
  });

  it('an LVM volume may name its logical volume as VG/LV', () => {
    const lvVol = { name: 'pgdata', device: '/dev/bsnvg/pgdata', lv: 'bsnvg/pgdata', mountpoint: '/srv/pg' };
    expect(parseAgentConfig({ ...base, provider: 'lvm-thin', tracking: 'thin-delta', volumes: [lvVol] }).volumes[0]).toMatchObject({ lv: 'bsnvg/pgdata' });
    expect(problems({ ...base, volumes: [{ ...lvVol, lv: 'pgdata' }] })).toEqual(['config.json: volumes[0].lv: must be VG/LV']);
  });

  it('names the file and the JSON error of an unparsable file', async () => {
    const file = join(dir, 'broken.json');
    await writeFile(file, '{ "agent": ');
    expect(() => loadAgentConfig(file)).toThrow(new RegExp(`cannot read agent config ${file}`));
  });
});
