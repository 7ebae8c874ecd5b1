import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

/*
 * Which modules a node process loads (start-up cost, issue 8): a child node
 * whose ES module loader appends every URL it loads to a file. CommonJS
 * modules required from CommonJS do not pass the hook; a package's entry does.
 */
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** The compiled code the checks run (`npm run build`); BSN_LAZY_DIST points them at another build (e.g. an older one, to see them fail). */
export const distDir = process.env.BSN_LAZY_DIST ?? path.join(repoRoot, 'dist');
export const distUrl = (rel: string) => pathToFileURL(path.join(distDir, rel)).href;

const HOOK = `import { register } from 'node:module';
register('data:text/javascript,' + encodeURIComponent(\`
import { appendFileSync } from 'node:fs';
export async function load(url, ctx, next) { appendFileSync(process.env.LOADLOG, url + '\\\\n'); return next(url, ctx); }
\`));
`;

export interface Loads {
  urls: string[];
  code: number;
  stderr: string;
}

/** Runs `node --import <hook> ...args` (cwd: the repository) with its scratch files in `dir`. */
export async function moduleLoads(dir: string, args: string[]): Promise<Loads> {
  const hook = path.join(dir, 'load-hook.mjs');
  const log = path.join(dir, 'loads.txt');
  await writeFile(hook, HOOK);
  await writeFile(log, '');
  let code = 0;
  let stderr = '';
  try {
    ({ stderr } = await promisify(execFile)(process.execPath, ['--import', pathToFileURL(hook).href, ...args],
      { cwd: repoRoot, env: { ...process.env, LOADLOG: log }, timeout: 60_000 }));
  } catch (e) {
    const err = e as { code?: unknown; stderr?: string };
    if (typeof err.code !== 'number') throw e;
    code = err.code;
    stderr = err.stderr ?? '';
  }
  return { urls: (await readFile(log, 'utf8')).split('\n').filter(Boolean), code, stderr };
}

/** The URLs matching any of `patterns`. */
export const loadedOf = (urls: string[], patterns: RegExp[]) => urls.filter((u) => patterns.some((re) => re.test(u)));
