<?php
/**
 * A client for bgservice: one file, no dependencies, PHP >= 7.4, standard streams only.
 *
 *   $bg = new BackgroundService('127.0.0.1:12341');   // or 'unix:///run/bgservice/bg.sock'
 *   $bg->send('log', 'user 42 logged in');             // UDP, fire and forget
 *   try {
 *       $css = $bg->call('less', $source);              // TCP, framed, persistent
 *   } catch (BackgroundServiceDown $e) {
 *       $css = shell_exec('lessc ...');                 // fall back: the service is down
 *   } catch (BackgroundServiceException $e) {
 *       error_log($e->getCode() . ': ' . $e->getMessage());  // the module's error reply
 *   }
 *   $id = $bg->add('thumbnail', $path, ['priority' => 5, 'retries' => 2]);
 *   $result = $bg->get($id);
 *
 * Calls use the framed protocol (docs/protocol.md) on one connection kept for the life of
 * the object (and of the PHP-FPM worker when $persistent is true), so a reply's status can
 * never be mistaken for data and a request of any size is safe.
 */

class BackgroundServiceException extends RuntimeException
{
}

/** The service cannot be reached: not running, wrong address, connection lost. */
class BackgroundServiceDown extends BackgroundServiceException
{
}

/** No reply within the timeout. */
class BackgroundServiceTimeout extends BackgroundServiceException
{
}

class BackgroundService
{
    const PREFACE = "\x00:F1";
    const ADD_OPTIONS = ['priority', 'delay', 'at', 'retries', 'backoff', 'timeout', 'unique', 'after'];

    /** @var string */
    private $address;
    /** @var string */
    private $udpAddress;
    /** @var float */
    private $timeout;
    /** @var bool */
    private $persistent;
    /** @var resource|null */
    private $conn = null;

    /**
     * @param string      $address    "host:port" (TCP) or "unix:///path" (Unix stream socket)
     * @param float       $timeout    seconds to wait for a reply
     * @param string|null $udpAddress "host:port" (UDP) or "udg:///path" (Unix datagram) for
     *                                send(); by default the TCP host:port over UDP
     * @param bool        $persistent keep the connection across requests of a PHP-FPM worker
     */
    public function __construct($address = '127.0.0.1:12341', $timeout = 30.0, $udpAddress = null, $persistent = true)
    {
        $this->address = $address;
        $this->timeout = (float)$timeout;
        $this->persistent = $persistent;
        $this->udpAddress = $udpAddress !== null ? $udpAddress : $address;
    }

    public function __destruct()
    {
        if (!$this->persistent) {
            $this->close();
        }
    }

    public function close()
    {
        if ($this->conn !== null) {
            @fclose($this->conn);
            $this->conn = null;
        }
    }

    // --- calls ---------------------------------------------------------------------------

    /** Call $module over TCP; its reply. An error reply throws, with its code. */
    public function call($module, $data = '', $timeout = null)
    {
        return $this->request($module . ':' . $data, $timeout);
    }

    /** Fire and forget over UDP (or a Unix datagram socket). Never throws; false if it could
     * not even be sent. */
    public function send($module, $data = '')
    {
        $target = strpos($this->udpAddress, '://') !== false ? $this->udpAddress : 'udp://' . $this->udpAddress;
        $fp = @stream_socket_client($target, $errno, $errstr, 0.05);
        if (!$fp) {
            return false;
        }
        $sent = @fwrite($fp, $module . ':' . $data);
        fclose($fp);
        return $sent !== false && $sent > 0;
    }

    public function ping()
    {
        return $this->request('service:ping') === 'pong';
    }

    /** @return array */
    public function stats()
    {
        return json_decode($this->request('service:stats'), true);
    }

    // --- queue -----------------------------------------------------------------------------

    /**
     * Queue a job; its id. $options: priority, delay, at, retries, backoff, timeout, unique,
     * after (docs/queue.md).
     */
    public function add($module, $data = '', array $options = [])
    {
        $unknown = array_diff(array_keys($options), self::ADD_OPTIONS);
        if ($unknown) {
            throw new InvalidArgumentException('unknown queue option(s): ' . implode(', ', $unknown));
        }
        $query = $options ? '?' . http_build_query($options, '', '&', PHP_QUERY_RFC3986) : '';
        return $this->jobId($this->request('queue:add' . $query . ':' . $module . ':' . $data));
    }

    /** Wait for job $id; its result (its error reply throws). */
    public function get($id, $timeout = null)
    {
        return $this->request('queue:get:id:' . (int)$id, $timeout);
    }

    /** 0 waiting, 1 running, 2 finished. */
    public function check($id)
    {
        return (int)$this->request('queue:check:id:' . (int)$id);
    }

    /** @return array state, progress, position, attempts, times, error */
    public function status($id)
    {
        return json_decode($this->request('queue:status:id:' . (int)$id), true);
    }

    /** "cancelled" (it was waiting) or "cancelling" (it runs and was asked to stop). */
    public function cancel($id)
    {
        return $this->request('queue:cancel:id:' . (int)$id);
    }

    public function retry($id)
    {
        return $this->jobId($this->request('queue:retry:id:' . (int)$id));
    }

    // --- the connection ----------------------------------------------------------------

    /** One framed request; the reply body, or an exception carrying the error code. */
    public function request($payload, $timeout = null)
    {
        $timeout = $timeout !== null ? (float)$timeout : $this->timeout;
        for ($attempt = 1; $attempt <= 2; $attempt++) {
            $reused = $this->conn !== null;
            $conn = $this->connect();
            stream_set_timeout($conn, (int)$timeout, (int)(fmod($timeout, 1) * 1e6));
            $frame = pack('N', strlen($payload)) . $payload;
            try {
                $this->writeAll($conn, $frame);
                $head = $this->readExact($conn, 7);
                $status = (int)substr($head, 0, 3);
                $length = unpack('N', substr($head, 3, 4))[1];
                $body = $length > 0 ? $this->readExact($conn, $length) : '';
            } catch (BackgroundServiceTimeout $e) {
                $this->close();  // a late reply would be read as the next one's
                throw $e;
            } catch (BackgroundServiceDown $e) {
                $this->close();
                if ($reused) {
                    continue;  // a kept connection the service had closed: try a fresh one
                }
                throw $e;
            }
            if ($status !== 200) {
                throw new BackgroundServiceException($body, $status);
            }
            return $body;
        }
        throw new BackgroundServiceDown('connection to ' . $this->address . ' lost');
    }

    private function connect()
    {
        if ($this->conn !== null) {
            return $this->conn;
        }
        $target = strpos($this->address, '://') !== false ? $this->address : 'tcp://' . $this->address;
        $flags = STREAM_CLIENT_CONNECT | ($this->persistent ? STREAM_CLIENT_PERSISTENT : 0);
        $conn = @stream_socket_client($target, $errno, $errstr, min($this->timeout, 5.0), $flags);
        if (!$conn) {
            throw new BackgroundServiceDown("cannot reach the service at {$this->address}: $errstr", 0);
        }
        // A persistent socket may already have spoken the preface in an earlier request of
        // this PHP-FPM worker: its position is past it.
        if (!$this->persistent || ftell($conn) === 0) {
            stream_set_timeout($conn, 5);
            $this->writeAll($conn, self::PREFACE);
            if ($this->readExact($conn, 4) !== self::PREFACE) {
                @fclose($conn);
                throw new BackgroundServiceDown("{$this->address} does not speak the framed protocol");
            }
        }
        $this->conn = $conn;
        return $conn;
    }

    private function writeAll($conn, $data)
    {
        while ($data !== '') {
            $n = @fwrite($conn, $data);
            if ($n === false || $n === 0) {
                throw new BackgroundServiceDown('connection to ' . $this->address . ' lost while writing');
            }
            $data = (string)substr($data, $n);
        }
    }

    private function readExact($conn, $n)
    {
        $data = '';
        while (strlen($data) < $n) {
            $chunk = @fread($conn, $n - strlen($data));
            if ($chunk === false || $chunk === '') {
                $meta = stream_get_meta_data($conn);
                if (!empty($meta['timed_out'])) {
                    throw new BackgroundServiceTimeout('no reply from ' . $this->address . ' in time', 0);
                }
                if (feof($conn) || $chunk === false) {
                    throw new BackgroundServiceDown('connection to ' . $this->address . ' closed', 0);
                }
            }
            $data .= $chunk;
        }
        return $data;
    }

    private function jobId($reply)
    {
        if (strncmp($reply, 'id:', 3) !== 0) {
            throw new BackgroundServiceException('unexpected reply: ' . substr($reply, 0, 80), 500);
        }
        return (int)substr($reply, 3);
    }
}
