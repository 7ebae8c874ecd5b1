/**
 * The control socket of both daemons (agent: STATE/agent.sock, appliance:
 * DATA/control.sock): HTTP over a Unix socket, mode 0600, so only the
 * daemon's own user gets in. One server helper and one client, so both
 * sides answer and fail the same way:
 *
 * - a route answers one JSON value (200, application/json), or switches to
 *   NDJSON events (`call.events()`: progress lines as they happen) and then
 *   ends with `{"event":"result", ...its value}`;
 * - a failure answers `{"event":"error","code","message"}`: with a status
 *   from its code before anything was sent, as the last NDJSON line after;
 * - a request body is a JSON object of at most 64 KiB (a CLI sends a few
 *   hundred bytes).
 */
import { chmodSync, rmSync } from 'node:fs';
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect } from 'node:net';
import type { Logger } from 'pino';
import { BlocksnapError, ErrorCodes, toBlocksnapError, type ErrorCode } from '../errors.js';

export interface ControlCall {
  /** The request's JSON object ({} for a GET). */
  body: Record<string, unknown>;
  /** Aborted when the client goes away before the answer is complete. */
  signal: AbortSignal;
  /** Switches the answer to NDJSON; returns the function that writes one event line. */
  events(): (event: object) => void;
}

export type ControlHandler = (call: ControlCall) => unknown;
/** Routes by "METHOD /path", e.g. "GET /v1/status". */
export type ControlRoutes = Record<string, ControlHandler>;

export const CONTROL_SOCKET_MODE = 0o600;
const MAX_BODY_BYTES = 64 * 1024;

/** The status of an error answer, from its code. */
export function controlStatus(code: ErrorCode): number {
  if (code === 'E_NOT_FOUND' || code === 'E_UNKNOWN_VOLUME') return 404;
  if (code === 'E_BUSY') return 409;
  if (code === 'E_USAGE') return 400;
  return 500;
}

export class ControlSocketServer {
  private constructor(private readonly http: Server, readonly path: string) {}

  /**
   * Listens on `path`, replacing whatever file is there (callers check first
   * whether a live daemon answers on it: see socketAnswers), then makes the
   * socket 0600. A listen failure is E_CONFIG.
   */
  static async listen(path: string, routes: ControlRoutes, log: Logger): Promise<ControlSocketServer> {
    rmSync(path, { force: true });
    const http = createServer((req, res) => {
      serve(routes, req, res).catch((e) => {
        const err = toBlocksnapError(e);
        log.warn({ code: err.code, message: err.message, url: req.url }, 'control request failed');
        if (!res.headersSent) res.writeHead(controlStatus(err.code), { 'content-type': 'application/json' });
        res.end(JSON.stringify({ event: 'error', code: err.code, message: err.message }) + '\n');
      });
    });
    await new Promise<void>((resolve, reject) => {
      http.once('error', (e) => reject(new BlocksnapError('E_CONFIG', `cannot listen on ${path}: ${e.message}`, { cause: e })));
      http.listen(path, () => resolve());
    });
    chmodSync(path, CONTROL_SOCKET_MODE);
    return new ControlSocketServer(http, path);
  }

  async close(): Promise<void> {
    this.http.closeAllConnections();
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
    rmSync(this.path, { force: true });
  }
}

async function serve(routes: ControlRoutes, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const key = `${req.method} ${req.url ?? ''}`;
  const handler = Object.hasOwn(routes, key) ? routes[key] : undefined;
  if (!handler) throw new BlocksnapError('E_NOT_FOUND', `no such control endpoint ${key}`);
  const body = req.method === 'GET' ? {} : await readJsonBody(req, MAX_BODY_BYTES);
  const abort = new AbortController();
  res.once('close', () => {
    if (!res.writableFinished) abort.abort(new BlocksnapError('E_CANCELLED', 'the client went away'));
  });
  let streaming = false;
  const write = (event: object) => res.write(JSON.stringify(event) + '\n');
  const value = await handler({
    body,
    signal: abort.signal,
    events() {
      if (!streaming) res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      streaming = true;
      return write;
    },
  });
  if (streaming) res.end(JSON.stringify({ event: 'result', ...(value as object) }) + '\n');
  else res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(value) + '\n');
}

/** The request's JSON object body, bounded. */
async function readJsonBody(req: IncomingMessage, maxBytes: number): Promise<Record<string, unknown>> {
  const parts: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > maxBytes) throw new BlocksnapError('E_USAGE', 'request body too large');
    parts.push(c as Buffer);
  }
  try {
    const v = JSON.parse(Buffer.concat(parts).toString('utf8') || '{}');
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v;
  } catch (e) {
    throw new BlocksnapError('E_USAGE', 'request body is not a JSON object', { cause: e });
  }
}

/** True if something accepts connections on the Unix socket `path` (a live daemon, not a stale file). */
export function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** An error the daemon answered (as opposed to one reaching it). */
export class ControlAnswerError extends BlocksnapError {}

export interface ControlRequestOptions {
  /** NDJSON events other than the final result/error (progress, started). */
  onEvent?: (event: Record<string, any>) => void;
  /** The error when no daemon listens (no socket file, or nobody accepting); default E_DISCONNECTED. */
  notRunning?: (cause: Error) => BlocksnapError;
}

/**
 * One request to a control socket. Resolves with the JSON answer, or with
 * the final `result` event of an NDJSON answer; an error answer rejects with
 * a ControlAnswerError carrying the daemon's code. A daemon that goes away
 * before its answer is complete: E_DISCONNECTED.
 */
export function controlRequest<T = any>(
  socketPath: string,
  method: 'GET' | 'POST',
  path: string,
  body?: object,
  o: ControlRequestOptions = {},
): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method, headers: { 'content-type': 'application/json' } }, (res) => {
      const ndjson = (res.headers['content-type'] ?? '').startsWith('application/x-ndjson');
      let text = '';
      let final: Record<string, any> | undefined;
      let garbage: unknown;
      const take = (line: string) => {
        let v: any;
        try {
          v = JSON.parse(line);
        } catch (e) {
          garbage ??= e;
          return;
        }
        if (ndjson && v?.event !== 'result' && v?.event !== 'error') o.onEvent?.(v);
        else final = v;
      };
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        text += d;
        if (!ndjson) return;
        let nl;
        while ((nl = text.indexOf('\n')) >= 0) {
          const line = text.slice(0, nl);
          text = text.slice(nl + 1);
          if (line) take(line);
        }
      });
      // 'close' also fires when the daemon dies mid-answer ('end' then never comes).
      res.on('close', () => {
        if (text.trim()) take(text);
        if (final === undefined) {
          if (garbage) return reject(new BlocksnapError('E_PROTOCOL', `control socket ${socketPath} answered garbage`, { cause: garbage }));
          return reject(new BlocksnapError('E_DISCONNECTED', `control socket ${socketPath}: the daemon went away before its answer (see its log)`));
        }
        if (final?.event === 'error' || (!ndjson && res.statusCode !== 200)) {
          const code = typeof final?.code === 'string' && Object.hasOwn(ErrorCodes, final.code) ? (final.code as ErrorCode) : 'E_INTERNAL';
          return reject(new ControlAnswerError(code, String(final?.message ?? `HTTP ${res.statusCode}`)));
        }
        resolve(final as T);
      });
    });
    req.on('error', (e: NodeJS.ErrnoException) => {
      if ((e.code === 'ENOENT' || e.code === 'ECONNREFUSED') && o.notRunning) reject(o.notRunning(e));
      else reject(new BlocksnapError('E_DISCONNECTED', `control socket ${socketPath}: ${e.message}`, { cause: e }));
    });
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}
