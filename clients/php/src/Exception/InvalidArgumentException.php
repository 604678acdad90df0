<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * The caller passed something the service would refuse or misread (a job id that is
 * neither N nor "id:N", an unknown queue option); thrown before anything is sent.
 * It is an \InvalidArgumentException, so code written for the old client still catches it.
 */
class InvalidArgumentException extends \InvalidArgumentException implements ClientException
{
}
