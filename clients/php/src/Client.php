<?php

declare(strict_types=1);

namespace Bgservice\Client;

use Bgservice\Client\Exception\BatchException;
use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ReplyException;
use Bgservice\Client\Exception\ReplyTooLargeException;
use Bgservice\Client\Exception\ServiceDownException;
use Bgservice\Client\Exception\ServiceException;
use Bgservice\Client\Exception\TimeoutException;

/**
 * The bgservice client: module calls, fire-and-forget sends and the job queue.
 *
 *     use Bgservice\Client\Client;
 *     use Bgservice\Client\Exception\ReplyException;
 *     use Bgservice\Client\Exception\ServiceDownException;
 *
 *     $bg = new Client('127.0.0.1:12341');              // or 'unix:///run/bgservice/bg.sock'
 *     $bg->send('log', 'user 42 logged in');            // UDP, fire and forget
 *     try {
 *         $css = $bg->call('less', $source);            // TCP, framed, kept connection
 *     } catch (ServiceDownException $e) {
 *         $css = shell_exec('lessc ...');               // the service is down: fall back
 *     } catch (ReplyException $e) {
 *         error_log($e->getCode() . ': ' . $e->getMessage());  // the module's error reply
 *     }
 *     $id = $bg->add('thumbnail', $path, ['priority' => 5, 'retries' => 2]);
 *     $result = $bg->get($id);                          // or get('id:7'), the original's form
 *
 * Not final, and the constructor is the old BackgroundService's, because the old global
 * name is an alias of this class and existing code may extend it.
 */
class Client
{
    /** @deprecated the protocol's business: use Connection::PREFACE */
    public const PREFACE = Connection::PREFACE;

    /** The options queue:add takes (docs/queue.md). */
    public const ADD_OPTIONS = [
        'priority', 'delay', 'at', 'retries', 'backoff', 'timeout', 'unique', 'after',
        'name', 'tags',
    ];

    /** The longest reply a Client reads by default ($maxReplyBytes): 64 MiB, four times
     *  the service's own [limits] max_request_bytes, as in the Python client. */
    public const MAX_REPLY_BYTES = Connection::MAX_REPLY_BYTES;

    /** The states a job can be in (docs/queue.md): what jobs() takes as $state. */
    public const JOB_STATES = ['waiting', 'running', 'done', 'failed', 'cancelled'];

    /** A module name, as the service reads it: it takes the text up to the first ':' as
     *  the name and drops every character but these from it (bgservice/protocol.py), so
     *  any other name would call another module, or none. */
    private const MODULE_NAME = '/\A[A-Za-z0-9_-]+\z/';
    private const MODULE_RULE = 'one or more of A-Z a-z 0-9 _ -';

    /** A reply's status and its words when the service stops (docs/protocol.md), as it
     *  answers a call it cut or a request after the stop began. */
    private const STOPPING = 503;
    private const STOPPING_TEXT = 'Shutting down';

    private readonly Connection $connection;

    /** @var string the calls' address, as given: for messages */
    private readonly string $address;

    /** @var float the calls' timeout unless they give their own: for messages */
    private readonly float $timeout;

    /** @var string|null send()'s address, as given (or derived from $address) */
    private readonly ?string $udpAddress;

    /** @var string|null send()'s address as stream_socket_client() takes it */
    private readonly ?string $udpTarget;

    /**
     * @param string      $address    "host:port" or "[v6]:port" (TCP); "unix:///path",
     *                                "unix:PATH" or a path with a "/" (a Unix stream socket)
     * @param float       $timeout    seconds to wait for a reply: more than 0, at most a week
     * @param string|null $udpAddress for send(): "host:port" or "[v6]:port" (UDP), or a
     *                                Unix datagram socket as "udg:///path" or its path; by
     *                                default the TCP host:port, over UDP. A Unix $address
     *                                has no datagram twin at a known path: send() then
     *                                needs it (the listener's unix_dgram)
     * @param bool        $persistent keep the connection across requests of a PHP-FPM worker
     * @param int         $maxReplyBytes the longest reply read, in bytes: one whose header
     *                                says more throws ReplyTooLargeException (a
     *                                ServiceDownException) as soon as the header is read,
     *                                and its connection is closed; a peer that is no
     *                                bgservice (a wrong port) could otherwise make the
     *                                client reserve up to 4 GiB, past PHP's memory_limit
     *
     * @throws InvalidArgumentException an address in none of those forms (Connection::target()),
     *                                  a $timeout that is not more than 0 and at most a
     *                                  week (the same for every method's $timeout), or a
     *                                  $maxReplyBytes under 1
     */
    public function __construct(
        string $address = '127.0.0.1:12341',
        float $timeout = 30.0,
        ?string $udpAddress = null,
        bool $persistent = true,
        int $maxReplyBytes = self::MAX_REPLY_BYTES,
    ) {
        $this->connection = new Connection($address, $timeout, $persistent, $maxReplyBytes);
        $this->address = $address;
        $this->timeout = $timeout;
        if ($udpAddress !== null && $udpAddress !== '') {  // '' is none, as in the Python client
            $this->udpTarget = Connection::target($udpAddress, true);
        } else {
            $stream = Connection::target($address);
            $this->udpTarget = str_starts_with($stream, 'tcp://') ? 'udp://' . substr($stream, 6) : null;
        }
        $this->udpAddress = $udpAddress !== null && $udpAddress !== '' ? $udpAddress
            : ($this->udpTarget !== null ? $address : null);
    }

    /** Close the connection now (a persistent one too); the next call opens a new one. */
    public function close(): void
    {
        $this->connection->close();
    }

    // --- calls -------------------------------------------------------------------------

    /**
     * Call $module over TCP; its reply.
     *
     * @throws ReplyException       the module replied an error (getCode() is its status)
     * @throws ServiceDownException the service cannot be reached, or is shutting down (its
     *                              "503: Shutting down": the call may have run), or the
     *                              reply is longer than $maxReplyBytes (ReplyTooLargeException)
     * @throws TimeoutException     no reply within $timeout (default: the constructor's)
     */
    public function call(string $module, string $data = '', ?float $timeout = null): string
    {
        return $this->request(self::module($module) . ':' . $data, $timeout);
    }

    /**
     * $module, if the service reads it as that name: "echo:x" called module echo with
     * "x:" in front of the data, and "ec ho" called echo, without a word.
     *
     * @throws InvalidArgumentException any other name (MODULE_NAME), empty included
     */
    private static function module(string $module): string
    {
        if (preg_match(self::MODULE_NAME, $module) !== 1) {
            throw new InvalidArgumentException('module name ' . var_export(substr($module, 0, 80), true)
                . ' is not one the service can take: a module name is ' . self::MODULE_RULE
                . " (the service drops any other character, and a ':' ends the name)");
        }
        return $module;
    }

    /**
     * Fire and forget over UDP (or a Unix datagram socket). Never throws because the
     * service is down, and never waits for it: that must not fail or hold up the caller.
     * False if it could not even be sent: nothing at the Unix datagram path, or its queue
     * full (a busy or hung service), which drops the datagram as a full UDP buffer does.
     *
     * @throws InvalidArgumentException what could never be sent, up or down: a module name
     *                                  the service cannot take (module()), no datagram
     *                                  address, or $module:$data larger than one datagram
     *                                  carries (over 65,507 bytes for UDP over IPv4)
     */
    public function send(string $module, string $data = ''): bool
    {
        $message = self::module($module) . ':' . $data;
        if ($this->udpTarget === null) {  // else the datagram would go to the stream socket
            throw new InvalidArgumentException(
                'send() needs $udpAddress: the address is a Unix stream socket '
                . '(pass the listener\'s unix_dgram path as "udg:///path", or a host:port)'
            );
        }
        $socket = @stream_socket_client($this->udpTarget, $errno, $errstr, 0.05);
        if ($socket === false) {
            return false;
        }
        // Never wait. Linux queues only net.unix.max_dgram_qlen (10) datagrams on a Unix
        // datagram socket the service does not read (busy, or stopped), and a blocking write
        // then waits for room: for ever for a hung service. Non-blocking, a write that would
        // wait writes nothing (0, no warning): that datagram is dropped.
        stream_set_blocking($socket, false);
        error_clear_last();
        $sent = @fwrite($socket, $message);
        fclose($socket);
        if ($sent === false && self::tooLong(error_get_last()['message'] ?? '')) {
            throw new InvalidArgumentException(
                "send(): $module:DATA is " . strlen($message) . ' bytes, more than one '
                . "datagram to {$this->udpAddress} carries: use call() or add()"
            );
        }
        return $sent !== false && $sent > 0;
    }

    /**
     * Whether a failed datagram write's warning ("Send of N bytes failed with errno=E
     * ...") is the kernel's EMSGSIZE: too large for one datagram, whatever the service.
     */
    private static function tooLong(string $warning): bool
    {
        $emsgsize = match (true) {
            defined('SOCKET_EMSGSIZE') => SOCKET_EMSGSIZE,  // ext/sockets knows this system's
            PHP_OS_FAMILY === 'Linux' => 90,
            PHP_OS_FAMILY === 'Windows' => 10040,  // WSAEMSGSIZE
            default => 40,  // the BSDs, macOS
        };
        return str_contains($warning, "errno=$emsgsize ");
    }

    public function ping(): bool
    {
        return $this->request('service:ping') === 'pong';
    }

    /**
     * The service's counters (service:stats).
     *
     * @return array<mixed> JSON decoded: its shape is the service's (docs/protocol.md)
     */
    public function stats(): array
    {
        return $this->decode($this->request('service:stats'));
    }

    /**
     * The modules the service has (service:modules): one array each, with its name,
     * state, transports, where it runs, timeout, load time, reloads and last load error.
     *
     * @return list<array<string, mixed>> JSON decoded: its shape is docs/protocol.md's
     */
    public function modules(): array
    {
        /** @var list<array<string, mixed>> */
        return $this->decode($this->request('service:modules'));
    }

    // --- queue -------------------------------------------------------------------------

    /**
     * Queue a job; its id. $options: priority, delay, at, retries, backoff, timeout,
     * unique, after, name, tags (docs/queue.md). `after`: the jobs it runs after, once all
     * of them succeeded: a job id (N or "id:N"), several in one string ("$a,$b") or a list
     * of them ([$a, $b]); `tags` a list (each item one tag: an empty one, or one with a
     * comma, is refused) or "a,b". Each value (each item of a list) an int,
     * float or string, a \Stringable (a UUID object: its string) or a backed enum (its
     * value); a bool is sent as 1 or 0, and null leaves the option out.
     *
     * @param array<string, int|float|string|bool|\Stringable|\BackedEnum|list<int|float|string|\Stringable|\BackedEnum>|null> $options
     *
     * @throws InvalidArgumentException a module name the service cannot take (module()),
     *                                  an unknown option, `wait` (run() waits), a value its
     *                                  option cannot take (an array but for after and tags,
     *                                  a nested one, another object, a pure enum, a
     *                                  resource), an item of a `tags` list that is empty or
     *                                  has a comma, or a bad `after` id: nothing is sent
     */
    public function add(string $module, string $data = '', array $options = []): int
    {
        return $this->newId($this->request($this->addRequest($module, $data, $options)));
    }

    /**
     * Queue a job and wait for its result, in one round trip (queue:add?wait=1): the job
     * is stored before it runs, as with add(), and its error reply throws.
     *
     * The reply carries the result only, so a TimeoutException cannot name the job: it
     * says whether the request was sent (wasSent(): then the job may have been queued,
     * and goes on) or not (no job was queued). To be able to follow it up, add() and then
     * get() its id (as the CLI's `queue add --wait` does).
     *
     * @param array<string, int|float|string|bool|\Stringable|\BackedEnum|list<int|float|string|\Stringable|\BackedEnum>|null> $options as add()'s
     */
    public function run(string $module, string $data = '', array $options = [], ?float $timeout = null): string
    {
        $payload = $this->addRequest($module, $data, $options, true);
        try {
            return $this->request($payload, $timeout);
        } catch (TimeoutException $e) {
            throw $this->ranOut($e, 'run()', $timeout, module: $module);
        }
    }

    /**
     * Queue several jobs, pipelined on the one connection; their ids in order. If some
     * were refused, BatchException: its getResults() has the ids of the others (queued).
     * If the connection fails part way, the ServiceDownException or TimeoutException has
     * getResults() too: the ids of the jobs queued, the exception itself for those sent
     * without a reply (they may be queued), null for those never sent; so does the
     * ServiceDownException of a stop of the service that cut some of them (each of those
     * is a ServiceDownException of its own).
     *
     * @param list<array{0: string, 1?: string|int|float, 2?: array<string, int|float|string|bool|\Stringable|\BackedEnum|list<int|float|string|\Stringable|\BackedEnum>|null>}> $jobs
     *        [module, data, options] each; data as call() takes it (an int or float is
     *        sent as PHP writes it, "5", as call() from a file without strict_types does)
     *
     * @return list<int>
     *
     * @throws InvalidArgumentException a job that is not [module, data, options], or
     *                                  options add() refuses: nothing is sent
     */
    public function addMany(array $jobs): array
    {
        $payloads = [];
        foreach ($jobs as $key => $job) {
            [$module, $data, $options] = self::job($key, $job);
            $payloads[] = $this->addRequest($module, $data, $options);
        }
        return $this->batch($payloads, null, fn (string $body): int => $this->newId($body));
    }

    /**
     * One job of addMany(), checked: a malformed one was a PHP warning and then a
     * TypeError, or the wrong job queued.
     *
     * @return array{0: string, 1: string, 2: array<string, int|float|string|bool|\Stringable|\BackedEnum|list<int|float|string|\Stringable|\BackedEnum>|null>}
     *
     * @throws InvalidArgumentException it is not [module, data, options]
     */
    private static function job(int|string $key, mixed $job): array
    {
        $problem = match (true) {
            !is_array($job) => 'an array [module, data, options], not ' . get_debug_type($job),
            !array_is_list($job) || $job === [] || count($job) > 3 => '[module, data, options] (a list of 1 to 3), not '
                . ($job === [] ? 'an empty array' : 'an array with keys ' . implode(', ', array_map('strval', array_keys($job)))),
            !is_string($job[0]) => 'a module name (a string) first, not ' . get_debug_type($job[0]),
            preg_match(self::MODULE_NAME, $job[0]) !== 1 => 'a module name (' . self::MODULE_RULE
                . ') first, not ' . var_export(substr($job[0], 0, 80), true),
            isset($job[1]) && !is_string($job[1]) && !is_int($job[1]) && !is_float($job[1])
                => 'data as a string (or an int or float), not ' . get_debug_type($job[1]),
            isset($job[2]) && !is_array($job[2]) => 'options as an array, not ' . get_debug_type($job[2]),
            default => null,
        };
        if ($problem !== null) {
            throw new InvalidArgumentException('addMany(): job ' . var_export($key, true) . " must be $problem");
        }
        /** @var array{0: string, 1?: string|int|float|null, 2?: array<string, int|float|string|bool|\Stringable|\BackedEnum|list<int|float|string|\Stringable|\BackedEnum>|null>|null} $job */
        return [$job[0], (string)($job[1] ?? ''), $job[2] ?? []];
    }

    /**
     * get() for several jobs, pipelined; their results in order (BatchException if some
     * ended in an error reply: getResults() has the others; a connection failure part way
     * has getResults() too, as addMany()'s). A TimeoutException names the first job
     * without a reply (getJobId()), as get()'s names its job.
     *
     * @param list<int|string> $ids N or "id:N" each
     *
     * @return list<string>
     *
     * @throws InvalidArgumentException an id that is neither: nothing is sent
     */
    public function getMany(array $ids, ?float $timeout = null): array
    {
        $jobs = [];
        foreach ($ids as $key => $id) {
            if (!is_int($id) && !is_string($id)) {
                throw new InvalidArgumentException('getMany(): id ' . var_export($key, true)
                    . " must be N or 'id:N', not " . get_debug_type($id));
            }
            $jobs[] = JobId::parse($id);
        }
        $payloads = array_map(fn (int $job): string => "queue:get:id:$job", $jobs);
        try {
            return $this->batch($payloads, $timeout, fn (string $body): string => $body);
        } catch (TimeoutException $e) {
            throw $this->ranOut($e, 'getMany()', $timeout, $jobs);
        }
    }

    /**
     * $e, its message saying what $call waited for and whose timeout ran out, the call's
     * own ($timeout) or the client's: "no reply in time" alone read as a service that
     * hung, for a job still running. get() and getMany() name the job (getJobId(): of a
     * batch, the first without a reply); run() (of $module) has no id until its result
     * comes: it says whether its job was queued. As the Python client's waiting_for().
     *
     * @param list<int> $jobs
     */
    private function ranOut(TimeoutException $e, string $call, ?float $timeout, array $jobs = [], ?string $module = null): TimeoutException
    {
        $seconds = $timeout ?? $this->timeout;
        $shown = sprintf('%g', round($seconds, 3) ?: $seconds);  // (as the Python client's)
        $limit = ($timeout === null ? "the client's timeout" : "$call's timeout") . " of $shown s";
        if ($module !== null) {
            $gaveUp = "$call of module $module gave up after $limit";
            $e->waitedFor($e->wasSent()
                ? "$gaveUp: its job may have been queued, and goes on under an id the client was not told (add() then get() keeps the id)"
                : "$gaveUp, before its request was sent: no job was queued");
            return $e;
        }
        $job = $jobs[self::firstUnanswered($e)];
        $first = count($jobs) > 1 ? ' (the first without a reply)' : '';
        $e->waitedFor("$call gave up waiting for job $job$first after $limit (the job goes on)", $job);
        return $e;
    }

    /** The index of a batch's first request without a reply (getResults()), else 0. */
    private static function firstUnanswered(TimeoutException $e): int
    {
        foreach ($e->getResults() ?? [] as $n => $result) {
            if ($result === null || $result instanceof TimeoutException) {
                return $n;
            }
        }
        return 0;
    }

    /**
     * Each reply's value, in order; BatchException if some were error replies. A failure
     * of the connection part way is rethrown with what is known (getResults()), and so
     * is a stop of the service that cut some of them (stopped()).
     *
     * @template T
     *
     * @param list<string>            $payloads
     * @param callable(string): T     $value
     *
     * @return list<T>
     */
    private function batch(array $payloads, ?float $timeout, callable $value): array
    {
        $outcome = fn (Reply $reply): mixed => $reply->isOk() ? $value($reply->body) : $this->failure($reply);
        try {
            $replies = $this->connection->requests($payloads, $timeout);
        } catch (ServiceException $e) {
            $known = $e->getResults();
            if ($known === null) {
                throw $e;
            }
            throw $e->withResults(array_map(fn (mixed $r): mixed => $r instanceof Reply ? $outcome($r) : $r, $known));
        }
        $results = array_map($outcome, $replies);
        $stopped = array_values(array_filter($results, fn (mixed $r): bool => $r instanceof ServiceDownException));
        if ($stopped !== []) {
            /** @var ServiceDownException $first the filter's */
            $first = $stopped[0];
            throw self::stopped($first, count($stopped), $results);
        }
        foreach ($results as $result) {
            if ($result instanceof ReplyException) {
                throw new BatchException($results);
            }
        }
        /** @var list<T> $results no ReplyException in it */
        return $results;
    }

    /**
     * For a batch that the service's stop cut ($count of its requests answered
     * "503: Shutting down", the first of them $first): $first again with $results, what
     * became of each request, as a connection lost part way has them. A BatchException
     * would be a ReplyException, which a fallback written for a service that is going
     * away (catch ServiceDownException) does not catch.
     *
     * @param list<mixed> $results
     */
    private static function stopped(ServiceDownException $first, int $count, array $results): ServiceDownException
    {
        $message = sprintf('%s; a batch of %d cut short: %d answered, %d cut by the stop (getResults() has each)',
            $first->getMessage(), count($results), count($results) - $count, $count);
        return $first->withResults($results, $message, $first);
    }

    /**
     * @param array<string, mixed> $options as add()'s
     *
     * @throws InvalidArgumentException a bad module name (module()), an unknown option, a
     *                                  value it cannot take (query()), or a bad `after` id
     */
    private function addRequest(string $module, string $data, array $options, bool $wait = false): string
    {
        self::module($module);
        if (array_key_exists('wait', $options)) {
            // add()/addMany() with wait ran the job, then failed to read an id from its result
            throw new InvalidArgumentException('option wait: add() and addMany() reply job ids; '
                . 'run() adds a job and waits for its result');
        }
        $unknown = array_diff(array_keys($options), self::ADD_OPTIONS);
        if ($unknown !== []) {
            throw new InvalidArgumentException('unknown queue option(s): ' . implode(', ', $unknown));
        }
        if ($wait) {
            $options = ['wait' => 1] + $options;
        }
        $query = self::query($options);
        return 'queue:add' . ($query !== '' ? "?$query" : '') . ':' . $module . ':' . $data;
    }

    /**
     * $options as a query string, each value made one the service takes first: given to
     * http_build_query() as they were, a \Stringable (a UUID object as `unique`) was
     * dropped without a word (no key: two jobs for two adds), a backed enum went out as
     * "priority[name]=...", and a list in `tags` as the tag "Array", with a mere warning.
     * A null value is left out, as the Python client leaves out None.
     *
     * @param array<array-key, mixed> $options
     *
     * @throws InvalidArgumentException a value its option cannot take: nothing is sent
     */
    private static function query(array $options): string
    {
        $values = [];
        foreach ($options as $name => $value) {
            if ($value === null) {
                continue;
            }
            $name = (string)$name;
            $values[$name] = match ($name) {
                // a list, or its items in one string: "N1,N2", "a,b"
                'after' => self::afterIds(is_array($value) ? self::items($name, $value) : self::scalar($name, $value)),
                'tags' => is_array($value) ? self::tags($value) : self::scalar($name, $value),
                default => self::optionValue($name, $value),
            };
        }
        return http_build_query($values, '', '&', PHP_QUERY_RFC3986);
    }

    /**
     * The value of option $name, which takes one: a bool as 1 or 0 (as http_build_query()
     * and the Python client send it: a yes or no to the service, e.g. a schedule's
     * `paused`), anything else as scalar() takes it.
     *
     * @throws InvalidArgumentException an array, or what scalar() refuses
     */
    private static function optionValue(string $name, mixed $value): int|float|string
    {
        if (is_array($value)) {
            throw new InvalidArgumentException(
                "option $name takes one value, not an array (only after and tags take a list)"
            );
        }
        return is_bool($value) ? (int)$value : self::scalar($name, $value);
    }

    /**
     * The items of list option $name, each as scalar() takes it (a nested array, a bool
     * or a null is none: it was the item "Array", "1" or "").
     *
     * @param array<mixed> $items
     *
     * @return list<int|float|string>
     *
     * @throws InvalidArgumentException an item scalar() refuses
     */
    private static function items(string $name, array $items): array
    {
        return array_map(
            fn (mixed $item): int|float|string => self::scalar($name, $item, 'each item of option'),
            array_values($items),
        );
    }

    /**
     * A list of tags as the service takes them, "a,b": each item one tag. Imploded as they
     * were, an item with a comma went out as two tags (['a,b'] tagged the job a and b)
     * and an empty one as a blank the service refuses; neither is a tag (docs/queue.md:
     * A-Z a-z 0-9 _ . : -). A string "a,b", not in a list, is two tags, as on the socket.
     *
     * @param array<mixed> $tags
     *
     * @throws InvalidArgumentException an item scalar() refuses, an empty one or one with a comma
     */
    private static function tags(array $tags): string
    {
        $items = self::items('tags', $tags);
        foreach ($items as $tag) {
            $tag = (string)$tag;
            if (trim($tag) === '' || str_contains($tag, ',')) {
                throw new InvalidArgumentException('each item of option tags must be one tag, '
                    . 'not empty and without a comma (a tag is A-Z a-z 0-9 _ . : -; a string "a,b" '
                    . 'is two tags), not ' . var_export(substr($tag, 0, 80), true));
            }
        }
        return implode(',', $items);
    }

    /**
     * $value as the query string writes it: an int, float or string as it is, a backed
     * enum as its value, a \Stringable (a UUID, a value object) as its string.
     *
     * @throws InvalidArgumentException anything else (an array, a bool, another object, a
     *                                  pure enum, a resource), naming the option
     */
    private static function scalar(string $name, mixed $value, string $what = 'option'): int|float|string
    {
        return match (true) {
            is_int($value), is_float($value), is_string($value) => $value,
            $value instanceof \BackedEnum => $value->value,
            $value instanceof \Stringable => (string)$value,
            default => throw new InvalidArgumentException("$what $name must be a string, an int, a float, "
                . 'a \\Stringable or a backed enum, not ' . get_debug_type($value)),
        };
    }

    /**
     * `after` as the service takes it, "N1,N2" (http_build_query then writes the comma as
     * %2C, which the service decodes): from a job id, N or "id:N", several of them in one
     * string ("$a,$b", which the old one-file client passed on as it was), or a list of
     * them. A list as it is would go out as after[0]=...&after[1]=..., which the service
     * refuses.
     *
     * @throws InvalidArgumentException an id that is neither N nor "id:N", or no id at all
     */
    private static function afterIds(mixed $after): string
    {
        $ids = match (true) {
            is_array($after) => $after,
            is_string($after) => explode(',', $after),  // blanks around each: JobId takes them
            default => [$after],
        };
        if ($ids === []) {
            throw new InvalidArgumentException('option after: no job id in an empty list');
        }
        $parsed = [];
        foreach ($ids as $id) {
            if (!is_int($id) && !is_string($id)) {
                throw new InvalidArgumentException(
                    'option after: a job id is N or "id:N", not ' . get_debug_type($id)
                );
            }
            $parsed[] = JobId::parse($id);
        }
        return implode(',', $parsed);
    }

    /**
     * Wait for job $id; its result (its error reply throws, e.g. 410 when cancelled).
     *
     * @param int|string $id N or "id:N"
     *
     * @throws InvalidArgumentException $id is neither
     * @throws TimeoutException         no result within $timeout: its message and getJobId()
     *                                  name the job, which goes on (check() or get() it later)
     */
    public function get(int|string $id, ?float $timeout = null): string
    {
        $job = JobId::parse($id);
        try {
            return $this->request("queue:get:id:$job", $timeout);
        } catch (TimeoutException $e) {
            throw $this->ranOut($e, 'get()', $timeout, [$job]);
        }
    }

    /**
     * 0 waiting, 1 running, 2 finished (the original's answer).
     *
     * @param int|string $id N or "id:N"
     */
    public function check(int|string $id): int
    {
        return (int)$this->request('queue:check:' . JobId::format($id));
    }

    /**
     * The job's state, progress, position, attempts, times and last error.
     *
     * @param int|string $id N or "id:N"
     *
     * @return array<mixed> JSON decoded: its shape is docs/queue.md's
     */
    public function status(int|string $id): array
    {
        return $this->decode($this->request('queue:status:' . JobId::format($id)));
    }

    /**
     * "cancelled" (it was waiting) or "cancelling" (it runs and was asked to stop).
     *
     * @param int|string $id N or "id:N"
     */
    public function cancel(int|string $id): string
    {
        return $this->request('queue:cancel:' . JobId::format($id));
    }

    /**
     * Run a failed or cancelled job again; its id (the same one). With $dependents, the
     * jobs that failed (424) because it did, and those that failed because of them, come
     * back too, each waiting for its `after` jobs again (docs/queue.md, retry); status()
     * or jobs('waiting') shows them. Without it, the request is the one older services
     * take.
     *
     * @param int|string $id N or "id:N"
     */
    public function retry(int|string $id, bool $dependents = false): int
    {
        $command = $dependents ? 'queue:retry?dependents=1:' : 'queue:retry:';
        return $this->newId($this->request($command . JobId::format($id)));
    }

    /**
     * A page of the jobs of $state, or of the waiting, running and failed ones
     * (queue:list), keyed by state: ['waiting' => [job, ...], ...], each job as status()
     * has it; waiting ones in the order they will run, finished ones newest first. The
     * Python client's list(): list() reads as PHP's list() construct, and jobs() as the
     * schedules() beside it.
     *
     * @param string|null $state  one of JOB_STATES; null the waiting, running and failed
     *                            jobs ('' is refused, as the service refuses an empty state)
     * @param int|null    $limit  jobs per state, at least 1; null the service's 100 (more
     *                            than its [queue] max_page, 1000, is answered with that many)
     * @param int         $offset jobs per state to skip: the next page's is $offset + $limit
     * @param string|null $module only the jobs of this module
     * @param string|null $name   only the jobs of this name (add()'s `name`), compared exactly
     * @param string|null $tag    only the jobs with this tag among theirs (one tag)
     *
     * $limit and $offset count the jobs the filters match (docs/queue.md, list; on Redis a
     * filter looks at the first 10,000 jobs of each state).
     *
     * @return array<string, list<array<string, mixed>>> JSON decoded: docs/queue.md's
     *
     * @throws InvalidArgumentException a state not in JOB_STATES, a $limit under 1 or a
     *                                  negative $offset (the service's 400): nothing is sent
     * @throws ReplyException           a filter the service refuses (400: an empty one, a
     *                                  module name or a tag no job can have)
     */
    public function jobs(
        ?string $state = null,
        ?int $limit = null,
        int $offset = 0,
        ?string $module = null,
        ?string $name = null,
        ?string $tag = null,
    ): array {
        $problem = self::pageProblem($state, $limit, $offset);
        if ($problem !== null) {
            throw new InvalidArgumentException("jobs(): $problem");
        }
        // The state as an option: the service reads options after the command name only,
        // so "queue:list:failed?limit=5" would be refused. 0 is the service's own offset.
        $query = self::query(['state' => $state, 'limit' => $limit, 'offset' => $offset ?: null,
            'module' => $module, 'name' => $name, 'tag' => $tag]);
        /** @var array<string, list<array<string, mixed>>> */
        return $this->decode($this->request('queue:list' . ($query !== '' ? "?$query" : '')));
    }

    /** What is wrong with jobs()' arguments, which the service would refuse with a 400; null: nothing. */
    private static function pageProblem(?string $state, ?int $limit, int $offset): ?string
    {
        return match (true) {
            $state !== null && !in_array($state, self::JOB_STATES, true) => 'state must be null (the waiting, running and failed jobs) or one of '
                . implode(', ', self::JOB_STATES) . ', not ' . var_export(substr($state, 0, 80), true),
            $limit !== null && $limit < 1 => "limit must be at least 1 (null: the service's 100), not $limit",
            $offset < 0 => "offset must be 0 or more, not $offset",
            default => null,
        };
    }

    /**
     * The queue's figures (queue:stats): jobs counted per state, the oldest waiting job's
     * age, jobs finished per minute, workers, and the run history of the last $window
     * seconds (runs, outcomes, busy time per hour).
     *
     * @param float|null $window seconds of history, a finite number of at least 1; null
     *                           the service's 3600 (an hour)
     *
     * @return array<string, mixed> JSON decoded: its shape is docs/queue.md's
     *
     * @throws InvalidArgumentException a $window under 1, INF or NAN (the service's 400):
     *                                  nothing is sent
     */
    public function queueStats(?float $window = null): array
    {
        if ($window !== null && !(is_finite($window) && $window >= 1.0)) {
            throw new InvalidArgumentException('queueStats(): window must be null or a finite number '
                . 'of seconds of at least 1, not ' . var_export($window, true));
        }
        $query = self::query(['window' => $window]);
        /** @var array<string, mixed> */
        return $this->decode($this->request('queue:stats' . ($query !== '' ? "?$query" : '')));
    }

    // --- schedules (recurring jobs, docs/queue.md) -------------------------------------

    /**
     * Every schedule, with its next run and the last slot it fired.
     *
     * @return list<array<string, mixed>>
     */
    public function schedules(): array
    {
        /** @var list<array<string, mixed>> */
        return $this->decode($this->request('queue:schedules'));
    }

    /**
     * Add or replace a schedule. $options: cron ("0 3 * * *") or every (seconds), tz,
     * missed ("once"/"skip"), paused, and its jobs' priority, retries, backoff, timeout.
     *
     * @param array<string, int|float|string|bool|\Stringable|\BackedEnum|null> $options
     *        each value as add()'s
     *
     * @return array<mixed> the schedule, as schedules() lists it
     *
     * @throws InvalidArgumentException a module name or a value add() would refuse:
     *                                  nothing is sent
     */
    public function schedule(string $name, string $module, string $data = '', array $options = []): array
    {
        $query = self::query(['name' => $name] + $options);
        $module = self::module($module);
        return $this->decode($this->request("queue:schedule?$query:$module:$data"));
    }

    /** @return array<mixed> the schedule */
    public function pause(string $name): array
    {
        return $this->decode($this->request("queue:pause:$name"));
    }

    /** @return array<mixed> the schedule */
    public function resume(string $name): array
    {
        return $this->decode($this->request("queue:resume:$name"));
    }

    public function unschedule(string $name): void
    {
        $this->request("queue:unschedule:$name");
    }

    /** Run the schedule's job now (an ordinary job); its id. */
    public function fire(string $name): int
    {
        return $this->newId($this->request("queue:fire:$name"));
    }

    // --- any request -------------------------------------------------------------------

    /**
     * Any raw request, e.g. request('queue:check:id:7'); the reply body. Sent as it is:
     * nothing in it is checked.
     *
     * @throws ReplyException       the service replied an error (getCode() is its status)
     * @throws ServiceDownException the service cannot be reached, or is shutting down (failure())
     * @throws ReplyTooLargeException the reply is longer than $maxReplyBytes: the connection is
     *                              closed (a ServiceDownException; the request may have run)
     * @throws TimeoutException     no reply in time
     */
    public function request(string $payload, ?float $timeout = null): string
    {
        $reply = $this->connection->request($payload, $timeout);
        if (!$reply->isOk()) {
            throw $this->failure($reply);
        }
        return $reply->body;
    }

    /**
     * The exception for error $reply: a ReplyException with its status, but for the
     * service's own "503: Shutting down" (a call the stop cut, or a request that came
     * after it began; "Shutting down: job 7 is still queued" for a queue:get or an
     * add-and-wait of a job it leaves queued, docs/protocol.md), a ServiceDownException,
     * as the same 503 refusing a new connection is: the service is going away, what the
     * caller's fallback is for.
     */
    private function failure(Reply $reply): ReplyException|ServiceDownException
    {
        $stopping = $reply->status === self::STOPPING && ($reply->body === self::STOPPING_TEXT
            || str_starts_with($reply->body, self::STOPPING_TEXT . ': '));
        return $stopping
            ? new ServiceDownException("the service at {$this->address} is shutting down "
                . "($reply->status {$reply->body}): the request may have run", $reply->status)
            : new ReplyException($reply->body, $reply->status);
    }

    /** @return array<mixed> */
    private function decode(string $json): array
    {
        $value = json_decode($json, true);
        if (!is_array($value)) {
            throw new ServiceException('unexpected reply: ' . substr($json, 0, 80), 500);
        }
        return $value;
    }

    private function newId(string $reply): int
    {
        // Not JobId::parse: a malformed reply is the service's fault, not the caller's.
        if (preg_match('/\Aid:([0-9]{1,19})\z/', $reply, $match) !== 1) {
            throw new ServiceException('unexpected reply: ' . substr($reply, 0, 80), 500);
        }
        return (int)$match[1];
    }
}
